# shellcheck shell=bash
# Settings and small helpers shared by every e2e script. Sourced, never run.
#
# Layout of the cache (outside the repository, shared by every checkout):
#   $VDEVD_E2E_CACHE/trixie         Debian trixie root (debootstrap minbase) with
#                                   QEMU 11 from trixie-backports and the guest tools
#   $VDEVD_E2E_CACHE/kernel/amd64   Debian guest kernel, unpacked (boot/, usr/lib/modules)
#   $VDEVD_E2E_CACHE/tools          debootstrap (unpacked) and the wget stand-in
#   $VDEVD_E2E_CACHE/images         guest initramfs images, one per profile and input hash
#   $VDEVD_E2E_CACHE/run            shared with the chroot at the same path: run
#                                   directories (sockets, disk images, logs) live here
# The same layout is used by ../shared/qemu-harness, so a cache provisioned by
# either works for both.
# shellcheck disable=SC2034 # the variables are used by the scripts that source this

E2E_DIR=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
E2E_REPO=$(cd "$E2E_DIR/../.." && pwd)
: "${VDEVD_E2E_CACHE:=$HOME/.cache/vdevd-e2e}"
: "${VDEVD_E2E_MIRROR:=http://deb.debian.org/debian}"
E2E_ROOT=$VDEVD_E2E_CACHE/trixie
E2E_SHARE=$VDEVD_E2E_CACHE/run
E2E_KERNEL_DIR=$VDEVD_E2E_CACHE/kernel/amd64
E2E_IMAGES=$VDEVD_E2E_CACHE/images
E2E_TOOLS=$VDEVD_E2E_CACHE/tools
E2E_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
export VDEVD_E2E_CACHE VDEVD_E2E_MIRROR

# Packages installed in the trixie root. QEMU comes from trixie-backports
# (11.x); everything else from trixie. The guest tools are copied from this
# root into the guest images (see lib/mkimage.sh).
E2E_HOST_PKGS="kmod cpio xz-utils zstd gcc libc6-dev"
E2E_GUEST_PKGS="busybox-static fio e2fsprogs util-linux pciutils nvme-cli"
E2E_QEMU_PKG=qemu-system-x86
E2E_QEMU_MAJOR=11

e2e_log() { printf 'e2e: %s\n' "$*" >&2; }
e2e_die() { printf 'e2e: error: %s\n' "$*" >&2; exit 1; }

e2e_need_root() {
    [ "$(id -u)" = 0 ] || e2e_die "must run as root (chroot, mount namespaces and bind mounts need it)"
}

# e2e_need_host_tools TOOL...: fail naming every missing host command.
e2e_need_host_tools() {
    local t missing=()
    for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
    [ "${#missing[@]}" = 0 ] || e2e_die "missing host commands: ${missing[*]} (install them with the host's package manager)"
}

# Run a command in the trixie root (see lib/chroot-run for what is shared).
e2e_chroot() { "$E2E_DIR/lib/chroot-run" "$@"; }

# The guest kernel version, from the unpacked tree (one version per cache).
e2e_kernel_version() {
    local d
    for d in "$E2E_KERNEL_DIR"/usr/lib/modules/*/; do
        [ -e "$d/modules.dep" ] || continue
        basename "$d"
        return 0
    done
    return 1
}

e2e_kernel_image() {
    local v
    v=$(e2e_kernel_version) || return 1
    [ -r "$E2E_KERNEL_DIR/boot/vmlinuz-$v" ] || return 1
    printf '%s\n' "$E2E_KERNEL_DIR/boot/vmlinuz-$v"
}

# Seconds since the epoch with centiseconds, and a difference, without bc.
e2e_now() { printf '%s\n' "${EPOCHREALTIME/./}"; }
e2e_elapsed() { # e2e_elapsed START_US -> "12.3"
    local d=$(($(e2e_now) - $1))
    printf '%d.%d\n' $((d / 1000000)) $((d % 1000000 / 100000))
}
