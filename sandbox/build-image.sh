#!/usr/bin/env bash
# Builds the isode sandbox image offline, from this machine's own node binary.
#
#   sandbox/build-image.sh [IMAGE]        (default: $ISODE_IMAGE or isode-sandbox:latest)
#
# The image is FROM scratch: the node binary, the shared libraries it links
# (resolved with ldd, never hardcoded), /etc/passwd and /etc/group with the
# unprivileged user sandbox (10001:10001) and an empty /tmp. There is no
# shell, no package manager and no agent inside: the worker passes the agent
# to node on its command line (sandbox/program.go), so the image need not be
# rebuilt when the agent changes. No registry is needed: the
# classic builder (DOCKER_BUILDKIT=0) copies the assembled root filesystem.
#
# The build is idempotent and fast when nothing changed: the image carries a
# label with a hash of every input, and an image whose label matches is kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image="${1:-${ISODE_IMAGE:-isode-sandbox:latest}}"
node_bin="${NODE:-$(command -v node || true)}"
[[ -n "$node_bin" ]] || { echo "build-image: no node binary on PATH (set NODE=/path/to/node)" >&2; exit 1; }
node_bin="$(readlink -f "$node_bin")"

# Resolve the libraries the binary needs: every "=> /path" and the loader.
mapfile -t libs < <(ldd "$node_bin" | awk '
  $2 == "=>" && $3 ~ /^\// { print $3; next }
  $1 ~ /^\// { print $1 }')
((${#libs[@]} > 0)) || { echo "build-image: ldd found no libraries for $node_bin" >&2; exit 1; }
for l in "${libs[@]}"; do [[ -e "$l" ]] || { echo "build-image: ldd names $l, which does not exist" >&2; exit 1; }; done

# The hash of every input decides whether a rebuild is needed.
inputs_hash="$(
  {
    echo "recipe 2"
    printf '%s\n' "$node_bin" "${libs[@]}"
    sha256sum "$node_bin" "$here/build-image.sh"
    for l in "${libs[@]}"; do sha256sum "$(readlink -f "$l")"; done
  } | sha256sum | cut -c1-32
)"

previous="$(docker image inspect --format '{{.Id}} {{ index .Config.Labels "io.isode.sandbox.inputs" }}' "$image" 2>/dev/null || true)"
current="${previous#* }"
if [[ "$current" == "$inputs_hash" ]]; then
  echo "build-image: $image is up to date (inputs $inputs_hash)"
  exit 0
fi

build="$here/.build"
rm -rf "$build"
root="$build/rootfs"
mkdir -p "$root/usr/bin" "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"

cp "$node_bin" "$root/usr/bin/node"
for l in "${libs[@]}"; do
  mkdir -p "$root$(dirname "$l")"
  cp -L "$l" "$root$l" # the path ldd names, with the symlink's target content
done

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/nonexistent:/nonexistent
sandbox:x:10001:10001:isode sandbox:/tmp:/nonexistent
nobody:x:65534:65534:nobody:/nonexistent:/nonexistent
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
sandbox:x:10001:
nogroup:x:65534:
GROUP

cat >"$build/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
ENV NODE_ENV=production
USER 10001:10001
WORKDIR /tmp
LABEL io.isode.app=isode io.isode.sandbox.inputs=$inputs_hash io.isode.sandbox.node=$("$node_bin" --version)
ENTRYPOINT ["/usr/bin/node"]
DOCKERFILE

echo "build-image: building $image from $node_bin ($("$node_bin" --version)) with ${#libs[@]} libraries"
if ! DOCKER_BUILDKIT=0 docker build --quiet --force-rm --tag "$image" "$build" >"$build/build.log" 2>&1; then
  cat "$build/build.log" >&2
  exit 1
fi
rm -rf "$build"
# The image this one replaces is left untagged: remove it unless a container
# still uses it (then it stays, and `docker image prune` gets it later).
if [[ -n "$previous" && "${previous%% *}" != "$(docker image inspect --format '{{.Id}}' "$image")" ]]; then
  docker image rm "${previous%% *}" >/dev/null 2>&1 || true
fi
echo "build-image: built $image (inputs $inputs_hash)"
