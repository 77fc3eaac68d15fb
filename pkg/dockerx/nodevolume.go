package dockerx

import (
	"context"
	"errors"
	"fmt"
	"path"
	"strings"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/api/types/mount"
	"github.com/docker/docker/api/types/volume"
)

// The shared node (Config.ShareNode). A storage driver that gives every
// container its own copy of the image's files in memory (fuse-overlayfs,
// vfs; overlay2 does not) makes each sandbox load node's code, some 15 MiB
// of it touched, privately: with tens of busy tenants every run then finds
// its process's code cold in the CPU's caches, which cost about a fifth of
// the sandboxes' CPU at 50 busy tenants on such an engine. So the
// directory that holds node in the image is copied once into a named
// volume (Docker copies an image's content into an empty volume mounted
// over it), and every sandbox mounts that volume, read-only, over the
// directory: the same bytes as the image's, from one file, whose pages all
// sandboxes share.
//
// Each Runtime has a volume of its own (isode-node-<worker id>), filled
// before its first sandbox and removed by its Close: Docker fills an empty
// volume at every create that mounts it, so two workers sharing one would
// race, one rewriting node while the other's sandboxes start it (CI saw
// "exec node failed: Permission denied"). A killed worker's volume is
// removed by the reaper of another worker of its fleet (reap.go).

// nodeVolume is the volume of the image's node directory and where it is
// mounted.
type nodeVolume struct {
	name string // isode-node-<worker id>
	dir  string // the directory in the image that holds node
}

// nodeVolumePrefix starts the name of every shared node volume.
const nodeVolumePrefix = "isode-node-"

func (v *nodeVolume) mount() mount.Mount {
	return mount.Mount{Type: mount.TypeVolume, Source: v.name, Target: v.dir, ReadOnly: true}
}

// labelImage, on a shared node volume, is the id of the image it was
// filled from.
const labelImage = "io.isode.image"

// openNodeVolume finds node's directory in the image (img is its
// inspection), makes the volume and fills it by creating (not starting)
// one container that mounts it. On failure it leaves no volume behind.
func (r *Runtime) openNodeVolume(ctx context.Context, img image.InspectResponse) (_ *nodeVolume, err error) {
	cctx, cancel := r.callCtx(ctx)
	defer cancel()
	v := &nodeVolume{name: nodeVolumePrefix + r.cfg.WorkerID}
	// A volume of this name is a leftover (worker ids are unique among
	// live workers): it may hold another image's node.
	r.closeNodeVolume(ctx, v)
	labels := map[string]string{LabelApp: AppName, LabelWorker: r.cfg.WorkerID, labelImage: img.ID}
	if r.cfg.Fleet != "" {
		labels[LabelFleet] = r.cfg.Fleet
	}
	made, err := r.cli.VolumeCreate(cctx, volume.CreateOptions{Name: v.name, Labels: labels})
	if err != nil {
		return nil, fmt.Errorf("create volume %s: %w", v.name, err)
	}
	if made.Labels[labelImage] != img.ID {
		// A leftover still in use: it is not ours to fill or remove.
		return nil, fmt.Errorf("volume %s exists and is in use, for image %q", v.name, made.Labels[labelImage])
	}
	defer func() {
		if err != nil {
			r.closeNodeVolume(ctx, v)
		}
	}()

	// A container of the image, never started, to look into it and to
	// fill the volume.
	probe := func(mounts []mount.Mount) (string, error) {
		resp, err := r.cli.ContainerCreate(cctx, &container.Config{Image: r.cfg.Image, Entrypoint: []string{r.cfg.Node}, Labels: map[string]string{LabelApp: AppName, LabelWorker: r.cfg.WorkerID}},
			&container.HostConfig{NetworkMode: "none", Mounts: mounts}, nil, nil, "isode-probe-"+randomHex(8))
		if err != nil {
			return "", err
		}
		return resp.ID, nil
	}
	v.dir = path.Dir(r.cfg.Node) // an absolute Node names its directory
	if !path.IsAbs(r.cfg.Node) {
		pid, err := probe(nil)
		if err != nil {
			return nil, fmt.Errorf("look into image %s: %w", r.cfg.Image, err)
		}
		v.dir, err = r.nodeDir(cctx, pid, img.Config.Env)
		if rerr := r.remove(ctx, pid); rerr != nil {
			err = errors.Join(err, rerr)
		}
		if err != nil {
			return nil, err
		}
	}
	fid, err := probe([]mount.Mount{v.mount()})
	if err != nil {
		return nil, fmt.Errorf("fill volume %s: %w", v.name, err)
	}
	if err := r.remove(ctx, fid); err != nil {
		return nil, err
	}
	return v, nil
}

// nodeDir returns the directory of the node binary (Config.Node, a name)
// in the created container id: the first directory of the image's PATH
// (from its env) that has it.
func (r *Runtime) nodeDir(ctx context.Context, id string, env []string) (string, error) {
	dirs := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, e := range env {
		if p, ok := strings.CutPrefix(e, "PATH="); ok {
			dirs = p
		}
	}
	for _, d := range strings.Split(dirs, ":") {
		if !path.IsAbs(d) {
			continue
		}
		st, err := r.cli.ContainerStatPath(ctx, id, path.Join(d, r.cfg.Node))
		if err == nil && !st.Mode.IsDir() {
			return path.Clean(d), nil
		}
		if err != nil && !cerrdefs.IsNotFound(err) {
			return "", fmt.Errorf("look for %s in image %s: %w", r.cfg.Node, r.cfg.Image, err)
		}
	}
	return "", fmt.Errorf("image %s has no %s on its PATH (%s)", r.cfg.Image, r.cfg.Node, dirs)
}

// closeNodeVolume removes the volume; one a container still uses stays.
func (r *Runtime) closeNodeVolume(ctx context.Context, v *nodeVolume) {
	cctx, cancel := r.callCtx(context.WithoutCancel(ctx))
	defer cancel()
	if err := r.cli.VolumeRemove(cctx, v.name, false); err != nil && !cerrdefs.IsNotFound(err) && !cerrdefs.IsConflict(err) {
		r.log.Warn("remove the shared node volume", "volume", v.name, "err", err)
	}
}

// reapNodeVolumes removes the shared node volumes of other workers of this
// fleet that are not alive and were made more than grace ago; one still
// in use (a sandbox of that worker that lives on) stays for a later pass.
func (r *Runtime) reapNodeVolumes(ctx context.Context, p *reaper, now time.Time) error {
	if p == nil || p.alive == nil || p.fleet == "" {
		return nil
	}
	cctx, cancel := r.callCtx(ctx)
	defer cancel()
	list, err := r.cli.VolumeList(cctx, volume.ListOptions{Filters: filters.NewArgs(
		filters.Arg("label", LabelApp+"="+AppName), filters.Arg("label", LabelFleet+"="+p.fleet))})
	if err != nil {
		return fmt.Errorf("list isode volumes: %w", err)
	}
	for _, v := range list.Volumes {
		w := v.Labels[LabelWorker]
		if w == "" || w == p.self || !strings.HasPrefix(v.Name, nodeVolumePrefix) || p.alive(w) {
			continue
		}
		if created, err := time.Parse(time.RFC3339, v.CreatedAt); err != nil || now.Sub(created) < p.grace {
			continue
		}
		switch err := r.cli.VolumeRemove(cctx, v.Name, false); {
		case err == nil:
			r.log.Info("reaped volume", "volume", v.Name, "worker", w, "fleet", p.fleet)
		case cerrdefs.IsNotFound(err), cerrdefs.IsConflict(err):
		default:
			return fmt.Errorf("remove volume %s: %w", v.Name, err)
		}
	}
	return nil
}
