# shellcheck shell=bash disable=SC2034,SC2016
# (the K_* settings are used by the scripts that source this file; the
# single-quoted ${...} are dpkg-query formats)
# Settings and helpers shared by build.sh and check.sh. Sourced, never run.
#
# Everything lives in the e2e cache, outside the repository:
#   $VDEVD_E2E_CACHE/trixie            Debian trixie root (provisioned by the harness):
#                                      the compiler, QEMU and busybox come from here
#   $VDEVD_E2E_CACHE/kernel/iommufd/   this directory's output:
#       bzImage, config, System.map    the kernel built by build.sh
#       stamp                          what it was built from (see build.sh)
#       logs/                          build and boot logs
#       work/                          transient: download, source tree, objects
#                                      (removed after a build unless VDEVD_KERNEL_KEEP=1)
#   $VDEVD_E2E_CACHE/run/              shared with the trixie root at the same path
#
# The trixie root is entered through ./kroot (a copy of the harness's chroot
# runner's behaviour, so that this directory works on its own).

KDIR=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
: "${VDEVD_E2E_CACHE:=$HOME/.cache/vdevd-e2e}"
export VDEVD_E2E_CACHE
K_ROOT=$VDEVD_E2E_CACHE/trixie
K_OUT=$VDEVD_E2E_CACHE/kernel/iommufd
K_SHARE=$VDEVD_E2E_CACHE/run
K_LOGS=$K_OUT/logs
# Debian's kernel source package; its version defaults to the trixie candidate
# (the same source as the harness's stock trixie guest kernel).
: "${VDEVD_KERNEL_SRC_PKG:=linux-source-6.12}"
: "${VDEVD_KERNEL_SRC_VERSION:=}"
# Packages the build needs inside the trixie root.
K_BUILD_PKGS="gcc make bc flex bison libelf-dev libssl-dev cpio xz-utils python3 busybox-static libc6-dev"

klog() { printf 'kernel: %s\n' "$*" >&2; }
kdie() { printf 'kernel: error: %s\n' "$*" >&2; exit 1; }
know() { date +%s.%N; }
# kelapsed T0: seconds since T0 (from know), one decimal
kelapsed() { awk -v a="$1" -v b="$(know)" 'BEGIN { printf "%.1f", b - a }'; }

kneed_root() {
    [ "$(id -u)" = 0 ] || kdie "must run as root (chroot, mount namespaces and bind mounts need it)"
    [ -x "$K_ROOT/usr/bin/env" ] || kdie "no trixie root at $K_ROOT (provision the e2e harness first)"
}

# kroot CMD [ARG...]: run CMD inside the trixie root (see the script).
kroot() { "$KDIR/kroot" "$@"; }

# kroot_pkgs PKG...: install into the trixie root whichever of PKG is missing.
# Another process may be using apt in the same root: wait for its lock.
# A -dev package whose library the root already has from another suite (QEMU
# from trixie-backports brings backports' libelf1t64) is asked for in that
# library's version, so apt need not downgrade the library.
kroot_pkgs() {
    local missing=() p lib v
    for p in "$@"; do
        chroot "$K_ROOT" dpkg-query -W -f='${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed && continue
        case $p in
        libelf-dev) lib=libelf1t64 ;;
        libssl-dev) lib=libssl3t64 ;;
        *) lib= ;;
        esac
        if [ -n "$lib" ] && v=$(chroot "$K_ROOT" dpkg-query -W -f='${Version}' "$lib" 2>/dev/null) && [ -n "$v" ]; then
            p=$p=$v
        fi
        missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    klog "installing into the trixie root: ${missing[*]}"
    kroot env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 \
        install --no-install-recommends "${missing[@]}" >&2 ||
        {
            kroot apt-get -q -o DPkg::Lock::Timeout=600 update >&2 &&
                kroot env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 \
                    install --no-install-recommends "${missing[@]}" >&2
        }
}

# ksrc_version: the version of $VDEVD_KERNEL_SRC_PKG to build (no network
# unless the root's package lists do not know the package yet).
ksrc_version() {
    if [ -n "$VDEVD_KERNEL_SRC_VERSION" ]; then
        echo "$VDEVD_KERNEL_SRC_VERSION"
        return
    fi
    local v
    v=$(chroot "$K_ROOT" apt-cache policy "$VDEVD_KERNEL_SRC_PKG" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then
        kroot apt-get -q -o DPkg::Lock::Timeout=600 update >&2 || return 1
        v=$(chroot "$K_ROOT" apt-cache policy "$VDEVD_KERNEL_SRC_PKG" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
    fi
    [ -n "$v" ] && [ "$v" != "(none)" ] || return 1
    echo "$v"
}

# kkey VERSION: the cache key of a kernel, from everything it is built from:
# the source package and version, the config fragment and the in-root build
# recipe. The compiler is the trixie root's gcc; its version is recorded in
# the stamp but is not part of the key.
kkey() {
    {
        printf '%s=%s\n' "$VDEVD_KERNEL_SRC_PKG" "$1"
        cat "$KDIR/iommufd.config" "$KDIR/build-inroot.sh"
    } | sha256sum | cut -c1-16
}

# kstamp_get FIELD: a field of the stamp of the kernel in the cache
kstamp_get() { sed -n "s/^$1=//p" "$K_OUT/stamp" 2>/dev/null; }
