package dockerx

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/docker/docker/api/types/container"
)

// MemoryStats is a container's memory use as its cgroup reports it.
type MemoryStats struct {
	// Usage is the cgroup's charge, page cache included.
	Usage uint64
	// WorkingSet is Usage less inactive file pages, as `docker stats`
	// shows it: what the container cannot give back under pressure.
	WorkingSet uint64
	// Limit is the cgroup's limit.
	Limit uint64
}

// Memory reads the container's memory use once.
func (s *Sandbox) Memory(ctx context.Context) (MemoryStats, error) {
	ctx, cancel := s.rt.callCtx(ctx)
	defer cancel()
	resp, err := s.rt.cli.ContainerStatsOneShot(ctx, s.id)
	if err != nil {
		return MemoryStats{}, fmt.Errorf("container stats: %w", err)
	}
	defer resp.Body.Close()
	var st container.StatsResponse
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return MemoryStats{}, fmt.Errorf("decode container stats: %w", err)
	}
	m := st.MemoryStats
	inactive := m.Stats["total_inactive_file"] // cgroup v1
	if v, ok := m.Stats["inactive_file"]; ok && inactive == 0 {
		inactive = v // cgroup v2
	}
	ws := m.Usage
	if inactive < ws {
		ws -= inactive
	}
	return MemoryStats{Usage: m.Usage, WorkingSet: ws, Limit: m.Limit}, nil
}
