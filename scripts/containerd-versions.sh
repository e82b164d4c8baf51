#!/usr/bin/env bash
# Provides the containerd versions the tests run on, without installing anything system-wide:
# each one's containerd, ctr and containerd-shim-runc-v2 end up in
# $SHOAL_CACHE/containerd/<version>/bin (SHOAL_CACHE defaults to /var/cache/shoal-dev), which the
# test harness puts first on PATH when SHOAL_CONTAINERD=<version> (tests/harness/containerd.py).
#
#   scripts/containerd-versions.sh [VERSION...]     default: every version below
#
#   2.3.7   the LTS, built from its Go module by scripts/go-install (Go toolchain + module proxy)
#   2.1.9   Debian unstable ("sid") package
#   1.7.24  Debian 13 ("trixie") package
#   1.6.20  Debian 12's own package (installed by scripts/setup.sh), linked from /usr/bin
#
# Debian packages of other suites are fetched with apt through a source list of their own
# (lists and archives under the cache, never the machine's sources) and unpacked with
# `dpkg -x`: the machine stays Debian 12, and nothing is registered with dpkg. Their binaries
# are Go programs that need nothing newer than Debian 12's libc. Each version is done once per
# machine (a `.done` stamp); concurrent runs wait for each other on a lock.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${SHOAL_CACHE:-/var/cache/shoal-dev}/containerd
BINARIES=(containerd ctr containerd-shim-runc-v2)
ALL=(2.3.7 2.1.9 1.7.24 1.6.20)

# The mirror the machine's own Debian sources use (deb822 or one-line format).
debian_mirror() {
  if [ -n "${SHOAL_DEBIAN_MIRROR:-}" ]; then
    echo "$SHOAL_DEBIAN_MIRROR"
    return
  fi
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
    | grep -v security | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | grep -v security \
    | sed 's/\[[^]]*\]//' | awk '{print $2}' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# Links the three binaries of DIR into $out/bin and checks they are the wanted version.
link_bins() {
  local from=$1 version=$2
  mkdir -p "$out/bin"
  for bin in "${BINARIES[@]}"; do
    [ -x "$from/$bin" ] || { echo "containerd-versions: no $from/$bin" >&2; return 1; }
    ln -sfn "$from/$bin" "$out/bin/$bin"
  done
  local got
  got=$("$out/bin/containerd" --version)
  case "$got" in
    *" $version"* | *" v$version"*) ;;
    *) echo "containerd-versions: wanted $version, $from/containerd says: $got" >&2; return 1 ;;
  esac
}

from_debian() {
  local version=$1 suite=$2
  local apt_dir=$cache/apt/$suite
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) $suite main" \
    >"$apt_dir/sources.list"
  local opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::archives=$apt_dir/archives"
    -o APT::Get::List-Cleanup=0)
  apt-get "${opts[@]}" update -qq >&2
  # The suite's revision of that upstream version (e.g. 1.7.24~ds1-6+deb13u1).
  local debver
  debver=$(apt-cache "${opts[@]}" madison containerd | awk -F'|' '{gsub(/ /, "", $2); print $2}' \
    | grep -E "^([0-9]+:)?${version//./\\.}[~+-]" | head -n1 || true)
  if [ -z "$debver" ]; then
    echo "containerd-versions: Debian $suite no longer has containerd $version:" >&2
    apt-cache "${opts[@]}" madison containerd >&2
    return 1
  fi
  local work=$out/.work
  rm -rf "$work"
  mkdir -p "$work"
  (cd "$work" && apt-get "${opts[@]}" -o APT::Sandbox::User=root download -qq "containerd=$debver" >&2)
  dpkg -x "$work"/containerd_*.deb "$out/root"  # unpacked only: dpkg does not record it
  rm -rf "$work"
  link_bins "$out/root/usr/bin" "$version"
}

from_go_module() {
  local version=$1
  local bin
  # Built with cgo and no extra build tags: containerd's btrfs snapshotter carries the kernel
  # headers it needs, so Debian's libbtrfs-dev is not required (checked with 2.3.7 on Debian 12,
  # Go 1.26). The harness disables the btrfs, zfs, devmapper and erofs plugins at run time.
  bin=$(scripts/go-install github.com/containerd/containerd/v2 "v$version" \
    cmd/containerd cmd/ctr cmd/containerd-shim-runc-v2)
  link_bins "$bin" "$version"
}

from_system() {
  local version=$1
  if ! command -v containerd >/dev/null; then
    echo "containerd-versions: $version comes from Debian 12's containerd package" \
      "(scripts/setup.sh installs it)" >&2
    return 1
  fi
  link_bins /usr/bin "$version"
}

provide() {
  local version=$1
  out=$cache/$version
  [ -f "$out/.done" ] && return 0
  rm -rf "$out/bin" "$out/root"
  mkdir -p "$out"
  echo "containerd-versions: preparing containerd $version in $out" >&2
  case "$version" in
    2.3.7) from_go_module "$version" ;;
    2.1.9) from_debian "$version" sid ;;
    1.7.24) from_debian "$version" trixie ;;
    1.6.20) from_system "$version" ;;
    *) echo "containerd-versions: unknown version $version (known: ${ALL[*]})" >&2; return 2 ;;
  esac
  touch "$out/.done"
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
versions=("$@")
[ $# -gt 0 ] || versions=("${ALL[@]}")
for version in "${versions[@]}"; do
  provide "$version"
  echo "$version $cache/$version/bin"
done
