# shellcheck shell=bash
# Builds one guest initramfs. Runs INSIDE the trixie root (fed to
# `chroot-run bash -s`), where the binaries, their libraries, kmod, cpio and
# zstd are. Arguments:
#   OUT KERNEL_DIR KVER "BINS" "FILES" "MODULES" [CSRC_DIR]
# BINS are copied with every library ldd names; FILES are copied as they are
# (symlinks followed); each CSRC_DIR/NAME.c becomes a static /usr/bin/NAME
# (guest-side helpers of the harness); MODULES are resolved with their dependencies against
# the guest kernel, decompressed (busybox's modprobe then needs no xz) and
# indexed with depmod, so the guest loads them with `modprobe NAME [params]`.
#
# Why an initramfs and not the trixie root over 9p: the guest then boots with
# no device of the harness's own on its PCI bus (suites count and bind PCI
# devices), a guest can never write into the shared cache, the image is one
# file that is built once and reused, and nothing in a run depends on 9p's
# speed under TCG. The cost is size: fio in Debian links librbd/libgfapi, so
# the image carries ~55 MiB of libraries; unpacking them costs about a second
# per boot (measured in README.md).
set -euo pipefail
out=$1 kdir=$2 kver=$3 bins=$4 files=$5 mods=$6 csrc=${7:-}

w=$(mktemp -d /tmp/e2e-image.XXXXXX)
trap 'rm -rf "$w"' EXIT
mkdir -p "$w"/usr/bin "$w"/usr/sbin "$w"/usr/lib "$w"/usr/lib64 \
    "$w"/dev "$w"/proc "$w"/sys "$w"/tmp "$w"/run "$w"/mnt "$w"/etc "$w"/root "$w"/var/tmp
# merged-/usr, like the root the binaries come from
for d in bin sbin lib lib64; do ln -s "usr/$d" "$w/$d"; done
touch "$w/etc/mtab"

copy_file() { # copy_file PATH: same path in the image, symlinks followed
    [ -e "$1" ] || { echo "mkimage: $1 not found in the trixie root" >&2; return 1; }
    mkdir -p "$w$(dirname "$1")"
    cp -L "$1" "$w$1"
}

cp /usr/bin/busybox "$w/usr/bin/busybox"
declare -A libs=()
for b in $bins; do
    copy_file "$b"
    # ldd lists "name => /path (addr)" and "/path (addr)"; static binaries none.
    while read -r lib; do libs[$lib]=1; done < <(ldd "$b" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
done
for lib in "${!libs[@]}"; do copy_file "$lib"; done
for f in $files; do copy_file "$f"; done
if [ -n "$csrc" ]; then
    for c in "$csrc"/*.c; do
        [ -e "$c" ] || continue
        gcc -O2 -Wall -Wextra -Werror -static -o "$w/usr/bin/$(basename "$c" .c)" "$c"
    done
fi

# Kernel modules and their dependencies, decompressed.
if [ -n "$mods" ]; then
    mdir=$w/usr/lib/modules/$kver
    mkdir -p "$mdir"
    for m in $mods; do
        modprobe -d "$kdir" -S "$kver" --show-depends "$m" ||
            { echo "mkimage: module $m not found for $kver" >&2; exit 1; }
    done | awk '$1 == "insmod" {print $2}' | sort -u | while read -r f; do
        rel=${f#*/lib/modules/"$kver"/}
        rel=${rel%.xz}
        rel=${rel%.zst}
        rel=${rel%.gz}
        mkdir -p "$mdir/$(dirname "$rel")"
        case "$f" in
            *.xz) xz -dc "$f" ;;
            *.zst) zstd -qdc "$f" ;;
            *.gz) gzip -dc "$f" ;;
            *) cat "$f" ;;
        esac >"$mdir/$rel"
    done
    cp "$kdir/usr/lib/modules/$kver/modules.builtin" "$kdir/usr/lib/modules/$kver/modules.order" "$mdir/"
    cp "$kdir/usr/lib/modules/$kver/modules.builtin.modinfo" "$mdir/" 2>/dev/null || true
    depmod -b "$w" "$kver"
fi

# Built aside and renamed: a concurrent run never sees half an image.
(cd "$w" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | zstd -q -T0 -6 >"$out.tmp.$$"
mv "$out.tmp.$$" "$out"
echo "mkimage: $out: $(du -h "$out" | cut -f1) compressed, $(du -sh "$w" | cut -f1) unpacked, $(find "$w/usr/lib/modules" -name '*.ko' 2>/dev/null | wc -l) modules"
