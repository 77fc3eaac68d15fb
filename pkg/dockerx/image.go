package dockerx

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/isode-run/isode/sandbox"
)

// ImageInfo is what CheckImage found in the sandbox image.
type ImageInfo struct {
	// Image is Config.Image.
	Image string
	// Node is the version of the image's node, e.g. "20.20.2".
	Node string
	// Modules are the directories snippets may require modules from, in
	// lookup order (the image's NODE_PATH and global node_modules folders
	// that no tenant can write to); empty when the image installs none.
	Modules []string
}

// imageHowTo says how to get a usable image; errors about the image end with it.
var imageHowTo = fmt.Sprintf("the sandbox image must provide Node.js %d or later as `node` on its PATH "+
	"(or at the path given as --node / ISODE_NODE): build the default one with `make sandbox-image`, "+
	"or pull or build one on an official Node.js image (`docker pull node:22-slim`; see \"Bring your own image\" in the README)",
	sandbox.MinNodeMajor)

// CheckImage checks, once, that sandboxes can be made from the image: it
// creates one under the full hardening, waits for its agent to be ready,
// reads node's version and module directories from it, and removes it.
// ctx bounds it as it bounds Create. An image whose node does not run
// there (none on the PATH, one that fails under the hardening, or one older
// than sandbox.MinNodeMajor) returns an error wrapping ErrUnavailable that
// names the image and says how to build or pull one; New already refused a
// missing image the same way.
func (r *Runtime) CheckImage(ctx context.Context) (ImageInfo, error) {
	info := ImageInfo{Image: r.cfg.Image}
	s, err := r.Create(ctx, "")
	if err != nil {
		if ctx.Err() != nil {
			return info, fmt.Errorf("check image %s: %w", r.cfg.Image, err)
		}
		return info, fmt.Errorf("%w: image %s: node does not run in it under the sandbox's hardening (%w); %s",
			ErrUnavailable, r.cfg.Image, err, imageHowTo)
	}
	defer func() {
		if err := s.Close(context.WithoutCancel(ctx)); err != nil {
			r.log.Warn("remove the image check's sandbox", "container", s.ID(), "err", err)
		}
	}()
	st, err := s.Ping(ctx)
	if err != nil {
		return info, fmt.Errorf("image %s: ping the check's sandbox: %w", r.cfg.Image, err)
	}
	info.Node, info.Modules = st.Node, st.Modules
	major, _, _ := strings.Cut(st.Node, ".")
	if n, err := strconv.Atoi(major); err != nil || n < sandbox.MinNodeMajor {
		return info, fmt.Errorf("%w: image %s has node %q; %s", ErrUnavailable, r.cfg.Image, st.Node, imageHowTo)
	}
	return info, nil
}
