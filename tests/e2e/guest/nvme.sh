# shellcheck shell=sh
# NVMe checks, run by the guest's own `nvme` driver against one controller
# (E2E_NVME_BDF), whoever emulates it: vdevd over vfio-user or QEMU's
# built-in nvme. Sourced by /init, which calls phase_<phase>.
#
# Config (from the host): E2E_NVME_BDF, E2E_EXPECT_BYTES, E2E_SEED.
# Namespace layout (sizes in bytes, S = namespace size, S >= 16 MiB):
#   [0, S-2MiB)        ext4
#   [S-2MiB, S-1MiB)   scratch for discard and write-zeroes
#   [S-1MiB, S)        a pattern the host regenerates and finds in the backing
#                      file after the guest powers off (tag tail-<seed>)
# The whole namespace is first covered by a verified pattern, first and last
# LBA included.

MiB=1048576
FS_MNT=/mnt
# shellcheck disable=SC2034 # read by the block checks of lib.sh
BLK_UNIT=LBA BLK_WHAT=namespace

# nvme_locate: set CTRL, NS, DEV, LBS, BYTES for E2E_NVME_BDF (main shell).
nvme_locate() {
    CTRL=
    NS=
    for _c in /sys/bus/pci/devices/"$E2E_NVME_BDF"/nvme/nvme*; do
        [ -d "$_c" ] || continue
        CTRL=${_c##*/}
        for _n in "$_c/$CTRL"n*; do
            [ -e "/sys/block/${_n##*/}" ] && NS=${_n##*/} && break
        done
    done
    [ -n "$CTRL" ] && [ -n "$NS" ] && [ -b "/dev/$NS" ] || return 1
    [ "$(cat "/sys/class/nvme/$CTRL/state")" = live ] || return 1
    DEV=/dev/$NS
    LBS=$(cat "/sys/block/$NS/queue/logical_block_size")
    BYTES=$(($(cat "/sys/block/$NS/size") * 512))
    SCRATCH=$(((BYTES / MiB - 2) * MiB))
    # shellcheck disable=SC2034 # read by check_final_state in lib.sh
    TAIL=$((BYTES - MiB))
}

check_bind() {
    wait_for 60 nvme_locate ||
        die "no live nvme controller with a namespace at $E2E_NVME_BDF after 60 s (driver: $(basename "$(readlink "/sys/bus/pci/devices/$E2E_NVME_BDF/driver" 2>/dev/null)" 2>/dev/null))"
    drv=$(basename "$(readlink "/sys/bus/pci/devices/$E2E_NVME_BDF/driver")")
    [ "$drv" = nvme ] || die "device bound to '$drv', not nvme"
    [ "$BYTES" = "$E2E_EXPECT_BYTES" ] || die "namespace $NS is $BYTES bytes, expected $E2E_EXPECT_BYTES"
    if [ $((BYTES % 4096)) != 0 ] || [ "$BYTES" -lt $((16 * MiB)) ]; then
        die "namespace size $BYTES is not a multiple of 4 KiB of at least 16 MiB (the checks need that)"
    fi
    info "nvme ctrl=$CTRL ns=$NS lba_size=$LBS bytes=$BYTES model=$(sed 's/ *$//; s/ /_/g' "/sys/class/nvme/$CTRL/model")"
}

check_identify() {
    nvme id-ctrl "/dev/$CTRL" >/tmp/id-ctrl.txt || die "Identify Controller through the admin queue failed"
    nvme id-ns "$DEV" -o json >/tmp/id-ns.json || die "Identify Namespace through the admin queue failed"
    cat /tmp/id-ns.json
    nsze=$(sed -n 's/.*"nsze"[^0-9]*\([0-9]*\).*/\1/p' /tmp/id-ns.json | head -n 1)
    [ -n "$nsze" ] || die "no nsze in Identify Namespace"
    [ $((nsze * LBS)) = "$BYTES" ] || die "Identify Namespace nsze=$nsze x $LBS != $BYTES bytes seen by the block layer"
}

check_discard() {
    q=/sys/block/$NS/queue
    [ "$(cat "$q/discard_max_bytes")" -gt 0 ] || die "the namespace does not advertise discard (Dataset Management)"
    discard_keeps_neighbours
    # What a discarded range reads back is the device's choice, told in
    # Identify Namespace DLFEAT bits 2:0 (1 = zeroes).
    dlfeat=$(sed -n 's/.*"dlfeat"[^0-9]*\([0-9]*\).*/\1/p' /tmp/id-ns.json | head -n 1)
    info "nvme dlfeat=${dlfeat:-unknown}"
    if [ -n "$dlfeat" ] && [ $((dlfeat & 7)) = 1 ]; then
        is_zero "$SCRATCH" $((512 * 1024)) || die "DLFEAT says deallocated blocks read as zeroes, but they do not"
    fi
}

check_write_zeroes() {
    pattern "scratch-$E2E_SEED" 0 256 4096 >/tmp/scratch.bin
    write_file_at /tmp/scratch.bin "$SCRATCH"
    blkdiscard -z -o $((SCRATCH + 256 * 1024)) -l $((256 * 1024)) "$DEV" || die "write-zeroes (blkdiscard -z) failed"
    is_zero $((SCRATCH + 256 * 1024)) $((256 * 1024)) || die "a write-zeroes range does not read back as zeroes"
    expect_range "$SCRATCH" $((256 * 1024)) /tmp/scratch.bin || die "write-zeroes changed data before its range"
    expect_range $((SCRATCH + 512 * 1024)) $((512 * 1024)) /tmp/scratch.bin $((512 * 1024)) ||
        die "write-zeroes changed data after its range"
}

check_reset() {
    mount -t ext4 "$DEV" "$FS_MNT" || die "mount failed"
    # The write returns when the reset has run (nvme_reset_ctrl_sync).
    echo 1 >"/sys/class/nvme/$CTRL/reset_controller" || die "writing reset_controller failed"
    wait_for 60 nvme_locate || die "controller not live again within 60 s of a reset (state $(cat "/sys/class/nvme/$CTRL/state"))"
    write_files "$FS_MNT" b
    sync
    verify_files "$FS_MNT"
    umount "$FS_MNT"
    fsck_clean
}

ns_gone() { [ ! -e "/sys/block/$NS" ]; }
check_rebind() {
    echo "$E2E_NVME_BDF" >/sys/bus/pci/drivers/nvme/unbind || die "unbind from nvme failed"
    wait_for 30 ns_gone || die "namespace $NS still present 30 s after unbind"
    echo "$E2E_NVME_BDF" >/sys/bus/pci/drivers/nvme/bind || die "bind to nvme failed"
    wait_for 60 nvme_locate || die "no live controller and namespace within 60 s of bind"
    mount -t ext4 "$DEV" "$FS_MNT" || die "mount after rebind failed"
    verify_files "$FS_MNT"
    write_files "$FS_MNT" c
    sync
    verify_files "$FS_MNT"
    umount "$FS_MNT"
    fsck_clean
}

phase_main() {
    check bind check_bind || return 0
    nvme_locate || return 0
    check identify check_identify
    check lba-edges check_lba_edges
    check pattern check_pattern
    check discard check_discard
    check write-zeroes check_write_zeroes
    check ext4 check_ext4
    check reset check_reset
    nvme_locate || return 0
    check rebind check_rebind
    nvme_locate || return 0
    check final-state check_final_state
}

# Only the checks named in E2E_NVME_CHECKS, in that order (the harness's
# self-test, and a quick way to run a few checks while debugging).
phase_checks() {
    for c in $E2E_NVME_CHECKS; do
        [ "$c" = bind ] || nvme_locate || return 0
        check "$c" "check_$(echo "$c" | tr - _)" || [ "$c" != bind ] || return 0
    done
}

# After a clean power-off and restart of the device: the files are there.
check_persist() {
    mount -t ext4 "$DEV" "$FS_MNT" || die "mount failed"
    verify_files "$FS_MNT"
}
check_flush() {
    dd if=/dev/urandom of="$FS_MNT/flushed.bin" bs=64k count=64 2>/dev/null
    (cd "$FS_MNT" && sha256sum flushed.bin >flushed.sha256)
    sync
}
phase_crash() {
    check bind check_bind || return 0
    nvme_locate || return 0
    check persist check_persist || return 0
    check flush check_flush || return 0
    mark flushed
    # Keep I/O in flight (file writes with fsync, direct reads) until the
    # host kills QEMU.
    (while :; do dd if=/dev/urandom of="$FS_MNT/churn.bin" bs=64k count=32 conv=fsync 2>/dev/null; done) &
    (while :; do dd if="$DEV" of=/dev/null bs=64k count=256 iflag=direct 2>/dev/null; done) &
    sleep 1
    mark busy
    sleep 3600
}

phase_recover() {
    check bind check_bind || return 0
    nvme_locate || return 0
    check recover check_recover
    check final-state check_final_state
}

# --- the device server killed (suite nvme-crash) ---------------------------
# srvkill: a fresh ext4 with a few files, then a writer that reports every
# file it has written, fsync'ed and `sync`ed (flushed to the device) as
# `E2E-INFO flushed-file NAME SHA256`, with reads in flight beside it, until
# the host kills the device server (SIGKILL) under it.
check_sk_setup() {
    mkfs.ext4 -q -F -b 4096 -L vdevd-crash "$DEV" $((SCRATCH / 4096)) || die "mkfs.ext4 failed"
    mkdir -p "$FS_MNT"
    mount -t ext4 "$DEV" "$FS_MNT" || die "mount of the new ext4 failed"
    write_files "$FS_MNT" base
    sync
}
sk_writer() {
    _trace_off
    _i=0
    while :; do
        _i=$((_i + 1))
        _f=w-$_i.bin
        dd if=/dev/urandom of=/tmp/w.bin bs=64k count=4 2>/dev/null
        _sum=$(sha256sum </tmp/w.bin | cut -d' ' -f1)
        # fsync the file, then sync the file system (journal commit, FLUSH):
        # only when both returned is the file reported as flushed.
        dd if=/tmp/w.bin of="$FS_MNT/$_f" bs=64k conv=fsync 2>/dev/null || break
        sync || break
        info flushed-file "$_f" "$_sum"
        [ "$_i" != 3 ] || mark busy
    done
}
phase_srvkill() {
    check bind check_bind || return 0
    nvme_locate || return 0
    check setup check_sk_setup || return 0
    sk_writer &
    (while :; do dd if="$DEV" of=/dev/null bs=64k count=256 iflag=direct 2>/dev/null; done) &
    sleep 3600
}

# srvkill_recover: a new guest on the restarted server. Every file in
# E2E_FLUSHED ("NAME:SHA256 ...", what the host saw reported as flushed
# before the kill) is there with its content, the setup files too, and the
# file system is clean once mounting has replayed its journal.
check_sk_recover() {
    mount -t ext4 "$DEV" "$FS_MNT" || die "mount after the server was killed failed"
    verify_files "$FS_MNT"
    _n=0
    for _e in $E2E_FLUSHED; do
        _f=${_e%%:*}
        [ -f "$FS_MNT/$_f" ] || die "$_f was flushed before the kill and is missing"
        _sum=$(sha256sum <"$FS_MNT/$_f" | cut -d' ' -f1)
        [ "$_sum" = "${_e#*:}" ] || die "$_f was flushed before the kill and reads back different ($_sum)"
        _n=$((_n + 1))
    done
    info flushed-verified "$_n"
    umount "$FS_MNT"
    fsck_clean
}
phase_srvkill_recover() {
    check bind check_bind || return 0
    nvme_locate || return 0
    check recover check_sk_recover
}
