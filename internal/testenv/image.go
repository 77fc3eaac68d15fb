package testenv

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/build"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/client"
)

// LabelTestImage marks the images tests build; its value is the image's tag.
const LabelTestImage = "io.isode.test-image"

// ImageSpec describes an image a test builds without a registry, the way
// sandbox/build-image.sh assembles the sandbox image: FROM scratch, files
// copied in.
type ImageSpec struct {
	// Node puts the host's node binary at this path in the image, with the
	// shared libraries ldd names at their own paths; "" leaves node out.
	Node string
	// Files are more files of the image: path in the image -> content.
	Files map[string]string
	// Dockerfile lines after FROM and COPY: ENV, USER, WORKDIR, ENTRYPOINT...
	Lines []string
}

// BuildImage builds spec as image tag on the engine with the classic
// builder (no registry, no RUN), labelled LabelTestImage=tag, and removes
// the image at cleanup. It fails the test on any error.
func BuildImage(t testing.TB, cli *client.Client, tag string, spec ImageSpec) string {
	t.Helper()
	files := map[string][]byte{}
	modes := map[string]int64{}
	for p, c := range spec.Files {
		files[p] = []byte(c)
	}
	if spec.Node != "" {
		node, err := filepath.EvalSymlinks(Node(t))
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(node)
		if err != nil {
			t.Fatal(err)
		}
		files[spec.Node], modes[spec.Node] = b, 0o755
		for _, l := range lddLibs(t, node) {
			b, err := os.ReadFile(l) // follows the symlink, as cp -L does
			if err != nil {
				t.Fatal(err)
			}
			files[l], modes[l] = b, 0o755
		}
	}
	var ctxTar bytes.Buffer
	tw := tar.NewWriter(&ctxTar)
	add := func(name string, body []byte, mode int64) {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(body)), ModTime: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(body); err != nil {
			t.Fatal(err)
		}
	}
	dirs := map[string]bool{}
	names := make([]string, 0, len(files))
	for p := range files {
		names = append(names, p)
	}
	sort.Strings(names)
	for _, p := range names {
		for d := filepath.Dir(p); d != "/" && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	dirList := make([]string, 0, len(dirs))
	for d := range dirs {
		dirList = append(dirList, d)
	}
	sort.Strings(dirList)
	for _, d := range dirList {
		if err := tw.WriteHeader(&tar.Header{Name: "rootfs" + d + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.WriteHeader(&tar.Header{Name: "rootfs/tmp/", Typeflag: tar.TypeDir, Mode: 0o1777, ModTime: time.Unix(0, 0)}); err != nil {
		t.Fatal(err)
	}
	for _, p := range names {
		mode := modes[p]
		if mode == 0 {
			mode = 0o644
		}
		add("rootfs"+p, files[p], mode)
	}
	df := "FROM scratch\nCOPY rootfs/ /\n" + strings.Join(spec.Lines, "\n") + "\n"
	add("Dockerfile", []byte(df), 0o644)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() { RemoveImage(t, cli, tag) })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	resp, err := cli.ImageBuild(ctx, &ctxTar, build.ImageBuildOptions{
		Tags:        []string{tag},
		Version:     build.BuilderV1,
		Remove:      true,
		ForceRemove: true,
		Labels:      map[string]string{LabelTestImage: tag},
	})
	if err != nil {
		t.Fatalf("build image %s: %v", tag, err)
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for {
		var m struct {
			Error string `json:"error"`
		}
		if err := dec.Decode(&m); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("build image %s: read the build's output: %v", tag, err)
		}
		if m.Error != "" {
			t.Fatalf("build image %s: %s", tag, m.Error)
		}
	}
	return tag
}

// RemoveImage removes a test's image by tag; a missing one is no error.
func RemoveImage(t testing.TB, cli *client.Client, tag string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := cli.ImageRemove(ctx, tag, image.RemoveOptions{Force: true, PruneChildren: true}); err != nil && !client.IsErrNotFound(err) {
		t.Errorf("remove image %s: %v", tag, err)
	}
}

// lddLibs returns the libraries ldd names for a binary, and its loader.
func lddLibs(t testing.TB, bin string) []string {
	t.Helper()
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		t.Fatalf("ldd %s: %v", bin, err)
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		}
	}
	if len(libs) == 0 {
		t.Fatalf("ldd names no library for %s", bin)
	}
	return libs
}

// ModuleImage builds a bring-your-own-image test image: no agent, node at
// /usr/local/bin/node (as in the official images) with its libraries, a
// module isode-pad installed where `npm install -g` puts it, which
// requires isode-twice from the image's NODE_PATH (/opt/mods; the /tmp
// entry must be ignored), and an entrypoint, user and working directory
// that are not the sandbox's. isode-pad(s, n) returns s twice, padded with
// '*' to n characters. It returns the tag and the module directories the
// agent should find, in order.
func ModuleImage(t testing.TB, cli *client.Client) (tag string, modules []string) {
	t.Helper()
	tag = "isode-test-byoi:" + randomSuffix()
	BuildImage(t, cli, tag, ImageSpec{
		Node: "/usr/local/bin/node",
		Files: map[string]string{
			"/usr/local/lib/node_modules/isode-pad/package.json": `{"name": "isode-pad", "version": "1.0.0", "main": "lib/pad.js"}`,
			"/usr/local/lib/node_modules/isode-pad/lib/pad.js":   "const twice = require('isode-twice');\nmodule.exports = (s, n) => twice(s).padStart(n, '*');\n",
			"/opt/mods/isode-twice/index.js":                     "module.exports = (s) => s + s;\n",
			"/srv/app/.keep":                                     "",
		},
		Lines: []string{
			"ENV PATH=/usr/local/bin:/usr/bin:/bin NODE_PATH=/opt/mods:/tmp/mods",
			"USER 1000:1000",
			"WORKDIR /srv/app",
			`ENTRYPOINT ["/usr/local/bin/node", "-e", "console.error('not the agent'); process.exit(3)"]`,
		},
	})
	return tag, []string{"/opt/mods", "/usr/local/lib/node_modules"}
}

// NoNodeImage builds an image with no node in it (only /etc/passwd).
func NoNodeImage(t testing.TB, cli *client.Client) string {
	t.Helper()
	tag := "isode-test-nonode:" + randomSuffix()
	return BuildImage(t, cli, tag, ImageSpec{
		Files: map[string]string{"/etc/passwd": "root:x:0:0:root:/:/nonexistent\n"},
	})
}

func randomSuffix() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}
