# shellcheck shell=sh
# virtio-blk checks, run by the guest's own `virtio_blk` driver against one
# virtio block device at E2E_VBLK_BDF, whoever serves it: vdevd over
# vfio-user (a virtio-pci function), vdevd over vhost-user (QEMU's
# vhost-user-blk-pci) or QEMU's built-in virtio-blk-pci.
# Sourced by /init, which calls phase_<phase>.
#
# Config (from the host): E2E_VBLK_BDF, E2E_EXPECT_BYTES, E2E_EXPECT_QUEUES,
# E2E_SEED.
# Disk layout (S = disk size, S >= 16 MiB):
#   [0, S-2MiB)        ext4
#   [S-2MiB, S-1MiB)   scratch for discard and write-zeroes
#   [S-1MiB, S)        a pattern the host regenerates and finds in the backing
#                      file after the guest powers off (tag tail-<seed>)

MiB=1048576
FS_MNT=/mnt
# shellcheck disable=SC2034 # read by the block checks of lib.sh
BLK_UNIT=sector BLK_WHAT=disk

# vblk_locate: set DISK, DEV, LBS, BYTES, SCRATCH, TAIL for E2E_VBLK_BDF.
vblk_locate() {
    DISK=
    for _d in /sys/bus/pci/devices/"$E2E_VBLK_BDF"/virtio*/block/vd*; do
        [ -e "$_d" ] && DISK=${_d##*/} && break
    done
    [ -n "$DISK" ] && [ -b "/dev/$DISK" ] || return 1
    DEV=/dev/$DISK
    LBS=$(cat "/sys/block/$DISK/queue/logical_block_size")
    BYTES=$(($(cat "/sys/block/$DISK/size") * 512))
    SCRATCH=$(((BYTES / MiB - 2) * MiB))
    # shellcheck disable=SC2034 # read by check_final_state in lib.sh
    TAIL=$((BYTES - MiB))
}

check_bind() {
    wait_for 60 vblk_locate ||
        die "no virtio block device under $E2E_VBLK_BDF after 60 s (driver: $(basename "$(readlink "/sys/bus/pci/devices/$E2E_VBLK_BDF/driver" 2>/dev/null)" 2>/dev/null))"
    drv=$(basename "$(readlink "/sys/bus/pci/devices/$E2E_VBLK_BDF/driver")")
    [ "$drv" = virtio-pci ] || die "PCI function bound to '$drv', not virtio-pci"
    vdrv=$(basename "$(readlink /sys/block/"$DISK"/device/driver)")
    [ "$vdrv" = virtio_blk ] || die "virtio device bound to '$vdrv', not virtio_blk"
    [ "$(cat /sys/bus/pci/devices/"$E2E_VBLK_BDF"/device)" = 0x1042 ] || [ "$(cat /sys/bus/pci/devices/"$E2E_VBLK_BDF"/device)" = 0x1001 ] ||
        die "PCI device ID $(cat /sys/bus/pci/devices/"$E2E_VBLK_BDF"/device) is not virtio-blk"
    [ "$BYTES" = "$E2E_EXPECT_BYTES" ] || die "disk $DISK is $BYTES bytes, expected $E2E_EXPECT_BYTES"
    if [ $((BYTES % 4096)) != 0 ] || [ "$BYTES" -lt $((16 * MiB)) ]; then
        die "disk size $BYTES is not a multiple of 4 KiB of at least 16 MiB (the checks need that)"
    fi
    feats=$(cat /sys/block/"$DISK"/device/features)
    info "vblk disk=$DISK lba_size=$LBS bytes=$BYTES features=$feats"
    info "vblk-serial $(cat /sys/block/"$DISK"/serial 2>/dev/null)"
    # VIRTIO_F_VERSION_1 (bit 32): a modern device, as negotiated.
    [ "$(echo "$feats" | cut -c33)" = 1 ] || die "VERSION_1 not negotiated (features $feats)"
}

# Multi-queue in use: the block layer has one hardware queue per virtqueue.
check_queues() {
    n=$(find /sys/block/"$DISK"/mq -mindepth 1 -maxdepth 1 -type d | wc -l)
    info "vblk-queues $n"
    [ "$n" = "$E2E_EXPECT_QUEUES" ] || die "the guest uses $n request queues, expected $E2E_EXPECT_QUEUES"
    # Both queues carry I/O: one reader pinned to each CPU.
    ncpu=$(grep -c ^processor /proc/cpuinfo)
    cpu=0
    while [ "$cpu" -lt "$ncpu" ]; do
        taskset -c "$cpu" dd if="$DEV" of=/dev/null bs=4096 count=256 iflag=direct 2>/dev/null || die "direct read on CPU $cpu failed"
        cpu=$((cpu + 1))
    done
    wc=$(cat /sys/block/"$DISK"/queue/write_cache)
    info "vblk-write-cache $wc"
    [ "$wc" = "write back" ] || die "write cache is '$wc': flush (and CONFIG_WCE) not in use"
}

check_discard() {
    q=/sys/block/$DISK/queue
    [ "$(cat "$q/discard_max_bytes")" -gt 0 ] || die "the disk does not advertise discard"
    discard_keeps_neighbours
}

check_write_zeroes() {
    q=/sys/block/$DISK/queue
    [ "$(cat "$q/write_zeroes_max_bytes")" -gt 0 ] || die "the disk does not advertise write-zeroes"
    pattern "scratch-$E2E_SEED" 0 256 4096 >/tmp/scratch.bin
    write_file_at /tmp/scratch.bin "$SCRATCH"
    blkdiscard -z -o $((SCRATCH + 256 * 1024)) -l $((256 * 1024)) "$DEV" || die "write-zeroes (blkdiscard -z) failed"
    is_zero $((SCRATCH + 256 * 1024)) $((256 * 1024)) || die "a write-zeroes range does not read back as zeroes"
    expect_range "$SCRATCH" $((256 * 1024)) /tmp/scratch.bin || die "write-zeroes changed data before its range"
    expect_range $((SCRATCH + 512 * 1024)) $((512 * 1024)) /tmp/scratch.bin $((512 * 1024)) ||
        die "write-zeroes changed data after its range"
}

disk_gone() { [ ! -e "/sys/block/$DISK" ]; }
# Unbind and bind the virtio-pci driver: a device reset and a new
# feature negotiation, then I/O.
check_rebind() {
    echo "$E2E_VBLK_BDF" >/sys/bus/pci/drivers/virtio-pci/unbind || die "unbind from virtio-pci failed"
    wait_for 30 disk_gone || die "disk $DISK still present 30 s after unbind"
    echo "$E2E_VBLK_BDF" >/sys/bus/pci/drivers/virtio-pci/bind || die "bind to virtio-pci failed"
    wait_for 60 vblk_locate || die "no virtio block device within 60 s of bind"
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
    vblk_locate || return 0
    check queues check_queues
    check lba-edges check_lba_edges
    check pattern check_pattern
    check discard check_discard
    check write-zeroes check_write_zeroes
    check ext4 check_ext4
    check rebind check_rebind
    vblk_locate || return 0
    check final-state check_final_state
}

phase_checks() {
    for c in $E2E_VBLK_CHECKS; do
        [ "$c" = bind ] || vblk_locate || return 0
        check "$c" "check_$(echo "$c" | tr - _)" || [ "$c" != bind ] || return 0
    done
}

check_persist() {
    mount -t ext4 "$DEV" "$FS_MNT" || die "mount failed"
    verify_files "$FS_MNT"
}
check_flush() {
    dd if=/dev/urandom of="$FS_MNT/flushed.bin" bs=64k count=64 2>/dev/null
    (cd "$FS_MNT" && sha256sum flushed.bin >flushed.sha256)
    sync
}
churn() {
    (while :; do dd if=/dev/urandom of="$FS_MNT/churn.bin" bs=64k count=32 conv=fsync 2>/dev/null; done) &
    (while :; do dd if="$DEV" of=/dev/null bs=64k count=256 iflag=direct 2>/dev/null; done) &
}
# crash: with I/O in flight the host kills QEMU.
phase_crash() {
    check bind check_bind || return 0
    vblk_locate || return 0
    check persist check_persist || return 0
    check flush check_flush || return 0
    mark flushed
    churn
    sleep 1
    mark busy
    sleep 3600
}

phase_recover() {
    check bind check_bind || return 0
    vblk_locate || return 0
    check recover check_recover
    check final-state check_final_state
}

# restart (vhost-user): the host kills vdevd during I/O and starts it again;
# QEMU reconnects and the guest's I/O goes on where it stopped.
check_survive() {
    mount -t ext4 "$DEV" "$FS_MNT" || die "mount failed"
    verify_files "$FS_MNT"
    dd if=/dev/urandom of=/tmp/before.bin bs=64k count=64 2>/dev/null
    cp /tmp/before.bin "$FS_MNT/before.bin"
    sync
}
check_resumed() {
    # Fresh writes and reads after the back-end came back, all verified.
    dd if=/dev/urandom of=/tmp/after.bin bs=64k count=64 2>/dev/null
    cp /tmp/after.bin "$FS_MNT/after.bin"
    sync
    drop_caches
    cmp "$FS_MNT/before.bin" /tmp/before.bin || die "a file written before the restart is not intact"
    cmp "$FS_MNT/after.bin" /tmp/after.bin || die "a file written after the restart is not intact"
    verify_files "$FS_MNT"
    umount "$FS_MNT"
    fsck_clean
}
# span SECONDS: write, read back and compare 256 KiB blocks in the scratch
# area (O_DIRECT) for SECONDS; every round trip must succeed.
span() {
    _end=$(($(cut -d. -f1 /proc/uptime) + $1))
    _n=0
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$_end" ]; do
        dd if=/dev/urandom of=/tmp/span.bin bs=64k count=4 2>/dev/null
        write_file_at /tmp/span.bin $((SCRATCH + (_n % 4) * 262144)) || die "write $_n failed"
        expect_range $((SCRATCH + (_n % 4) * 262144)) 262144 /tmp/span.bin || die "block $_n does not read back"
        _n=$((_n + 1))
    done
    info "span-rounds $_n"
}
phase_restart() {
    check bind check_bind || return 0
    vblk_locate || return 0
    check survive check_survive || return 0
    mark ready
    # I/O that spans the back-end's restart (the host kills vdevd a few
    # seconds after `ready` and starts it again).
    check span span 25
    check resumed check_resumed
    check final-state check_final_state
}
