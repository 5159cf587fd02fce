#!/bin/bash
# Builds the e2e guest kernel with iommufd and the VFIO cdev (Debian's trixie
# kernels have neither) from Debian's linux-source package, with a minimal
# config (tinyconfig + iommufd.config, everything built in), and caches it.
#
# Usage: build.sh [--force]
# Prints the path of the bzImage on stdout; progress goes to stderr.
#
# Idempotent: the kernel in $VDEVD_E2E_CACHE/kernel/iommufd/ is reused when
# its stamp's key matches the key of the source package version, the config
# fragment and the in-root build recipe (lib.sh: kkey). A warm cache costs one
# apt-cache look-up inside the trixie root and a hash (well under a second).
#
# Where it builds: inside the harness's trixie root, with trixie's gcc (the
# compiler Debian builds these kernels with), so nothing is installed on the
# host and the build is the same on every machine that has the harness. The
# build dependencies are installed there with apt-get when missing.
#
# Environment:
#   VDEVD_E2E_CACHE            the cache (default ~/.cache/vdevd-e2e)
#   VDEVD_KERNEL_SRC_PKG       source package (default linux-source-6.12)
#   VDEVD_KERNEL_SRC_VERSION   its version (default: trixie's candidate)
#   VDEVD_KERNEL_JOBS          make -j (default: number of CPUs)
#   VDEVD_KERNEL_TIMEOUT       seconds allowed for the whole cold build (default 5400)
#   VDEVD_KERNEL_KEEP=1        keep the .deb, source tree and objects in work/
#                              (a later build with a changed fragment is then
#                              incremental; costs about 2 GB)
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

force=0
[ "${1:-}" = --force ] && force=1
kneed_root
mkdir -p "$K_OUT" "$K_LOGS"

# One build at a time per cache; a second caller waits and then finds the
# kernel built.
exec 9>"$K_OUT/.lock"
flock 9

t0=$(know)
ver=$(ksrc_version) || kdie "no version of $VDEVD_KERNEL_SRC_PKG known to the trixie root's apt"
key=$(kkey "$ver")
if [ "$force" = 0 ] && [ -s "$K_OUT/bzImage" ] && [ "$(kstamp_get key)" = "$key" ]; then
    klog "up to date: $VDEVD_KERNEL_SRC_PKG $ver, key $key ($(kelapsed "$t0") s)"
    echo "$K_OUT/bzImage"
    exit 0
fi

: "${VDEVD_KERNEL_JOBS:=$(nproc)}"
: "${VDEVD_KERNEL_TIMEOUT:=5400}"
: "${VDEVD_KERNEL_KEEP:=0}"
work=$K_OUT/work
log=$K_LOGS/build.log
mkdir -p "$work"
: >"$log"
klog "building $VDEVD_KERNEL_SRC_PKG $ver (key $key); log: $log"

t_deps=$(know)
# shellcheck disable=SC2086 # a list of package names
kroot_pkgs $K_BUILD_PKGS
d_deps=$(kelapsed "$t_deps")

# The source package, fetched by the trixie root's apt (the host's apt
# configuration is not touched). A tree unpacked from another version is
# dropped.
t_dl=$(know)
deb=$work/${VDEVD_KERNEL_SRC_PKG}_${ver//:/%3a}_all.deb
if [ ! -s "$deb" ]; then
    rm -f "$work"/*.deb
    kroot sh -c "cd '$work' && apt-get -q -o APT::Sandbox::User=root download '$VDEVD_KERNEL_SRC_PKG=$ver'" >>"$log" 2>&1 ||
        { tail -n 20 "$log" >&2; kdie "downloading $VDEVD_KERNEL_SRC_PKG=$ver failed"; }
fi
[ -s "$deb" ] || kdie "expected $deb after the download"
d_dl=$(kelapsed "$t_dl")
if [ "$(cat "$work/src.version" 2>/dev/null)" != "$ver" ]; then
    rm -rf "$work/src" "$work/obj"
fi
echo "$ver" >"$work/src.version"

cp "$KDIR/iommufd.config" "$work/iommufd.config"
t_build=$(know)
if ! timeout "$VDEVD_KERNEL_TIMEOUT" nice -n 19 ionice -c3 "$KDIR/kroot" bash -s -- \
    "$deb" "$work" "$work/iommufd.config" "$VDEVD_KERNEL_JOBS" \
    <"$KDIR/build-inroot.sh" >>"$log" 2>&1; then
    grep '^build: ' "$log" >&2 || true
    tail -n 30 "$log" >&2
    kdie "kernel build failed (log: $log)"
fi
d_build=$(kelapsed "$t_build")
grep '^build: ' "$log" >&2 || true

obj=$work/obj
release=$(cat "$obj/include/config/kernel.release")
for f in bzImage config System.map; do rm -f "$K_OUT/$f.new"; done
cp "$obj/arch/x86/boot/bzImage" "$K_OUT/bzImage.new"
cp "$obj/.config" "$K_OUT/config.new"
cp "$obj/System.map" "$K_OUT/System.map.new"
for f in bzImage config System.map; do mv "$K_OUT/$f.new" "$K_OUT/$f"; done
total=$(kelapsed "$t0")
{
    echo "key=$key"
    echo "package=$VDEVD_KERNEL_SRC_PKG"
    echo "version=$ver"
    echo "release=$release"
    echo "fragment_sha256=$(sha256sum <"$KDIR/iommufd.config" | cut -d' ' -f1)"
    echo "bzimage_sha256=$(sha256sum <"$K_OUT/bzImage" | cut -d' ' -f1)"
    echo "compiler=$(chroot "$K_ROOT" gcc --version | head -n1)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "jobs=$VDEVD_KERNEL_JOBS"
    echo "seconds_deps=$d_deps"
    echo "seconds_download=$d_dl"
    echo "seconds_unpack_config_build=$d_build"
    echo "seconds_total=$total"
} >"$K_OUT/stamp.new"
mv "$K_OUT/stamp.new" "$K_OUT/stamp"

if [ "$VDEVD_KERNEL_KEEP" != 1 ]; then
    rm -rf "$work"
fi
klog "built $release in $total s (deps $d_deps s, download $d_dl s, unpack+config+build $d_build s): $K_OUT/bzImage ($(du -h "$K_OUT/bzImage" | cut -f1))"
echo "$K_OUT/bzImage"
