# shellcheck shell=bash
# Guest images. Sourced after common.sh.
#
# A guest's initramfs is two concatenated cpio archives, which the kernel
# unpacks in order:
#   1. a per-run overlay, uncompressed: /e2e/ with the guest scripts, the run's
#      config and any per-run files (a freshly built binary);
#   2. a base image per profile (images/<profile>.conf), zstd-compressed and
#      cached in $E2E_IMAGES under a hash of everything it is built from, so
#      it is rebuilt only when its inputs change.

# e2e_base_image PROFILE: print the path of the profile's base image, building
# it if needed.
e2e_base_image() {
    local profile=$1 conf=$E2E_DIR/images/$1.conf kver key out log
    [ -r "$conf" ] || e2e_die "no image profile $conf"
    kver=$(e2e_kernel_version) || e2e_die "no guest kernel under $E2E_KERNEL_DIR (run tests/e2e/provision)"
    local IMAGE_BINS="" IMAGE_FILES="" IMAGE_MODULES="" IMAGE_CSRC="" csrc="" c
    # shellcheck source=images/blk.conf
    . "$conf"
    key=$({
        cat "$E2E_DIR/lib/mkimage-inroot.sh" "$conf"
        for c in $IMAGE_CSRC; do cat "$E2E_DIR/guest/src/$c.c"; done
        printf '%s\n' "$kver"
        cat "$E2E_ROOT/var/lib/dpkg/status"
    } | sha256sum | cut -c1-16)
    out=$E2E_IMAGES/e2e-$profile-$key.cpio.zst
    if [ ! -s "$out" ]; then
        log=$E2E_SHARE/provision-logs/image-$profile.log
        mkdir -p "$(dirname "$log")"
        e2e_log "building guest image '$profile' ($out)"
        if [ -n "$IMAGE_CSRC" ]; then
            # The sources go where the trixie root can see them.
            csrc=$(mktemp -d "$E2E_SHARE/.csrc.XXXXXX")
            for c in $IMAGE_CSRC; do cp "$E2E_DIR/guest/src/$c.c" "$csrc/"; done
        fi
        if ! e2e_chroot bash -s -- "$out" "$E2E_KERNEL_DIR" "$kver" "$IMAGE_BINS" "$IMAGE_FILES" "$IMAGE_MODULES" "$csrc" \
            <"$E2E_DIR/lib/mkimage-inroot.sh" >"$log" 2>&1; then
            [ -z "$csrc" ] || rm -rf "$csrc"
            tail -n 30 "$log" >&2
            e2e_die "building guest image '$profile' failed (log: $log)"
        fi
        [ -z "$csrc" ] || rm -rf "$csrc"
        e2e_log "$(tail -n 1 "$log")"
    fi
    # Images unused for a week (other checkouts, old inputs) are pruned.
    touch "$out"
    find "$E2E_IMAGES" -maxdepth 1 -name 'e2e-*.cpio.zst' -mtime +7 -delete 2>/dev/null || true
    printf '%s\n' "$out"
}

# e2e_make_initrd OUT BASE OVERLAY_DIR: OUT = cpio(OVERLAY_DIR) + BASE.
# OVERLAY_DIR must be under $E2E_SHARE (the cpio runs in the trixie root).
e2e_make_initrd() {
    local out=$1 base=$2 overlay=$3
    {
        e2e_chroot sh -c 'cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet' sh "$overlay"
        cat "$base"
    } >"$out" || e2e_die "cannot build initrd $out"
}
