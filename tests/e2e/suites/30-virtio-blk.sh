# shellcheck shell=bash
# virtio-blk suites. One check list (guest/virtio-blk.sh), one vdevd device
# model, two transports, and QEMU's own device as the reference:
#   virtio-blk       both transports, one after the other (or those named
#                    in VDEVD_E2E_VBLK_TRANSPORTS):
#                    vfio-user   `vdevd virtio-blk --socket S --image FILE`,
#                                QEMU's vfio-user-pci (a virtio-pci function)
#                    vhost-user  `vdevd virtio-blk --vhost-user S --image
#                                FILE`, QEMU's vhost-user-blk-pci
#   virtio-blk-qemu  QEMU's built-in virtio-blk-pci on the same kind of
#                    backing file: proves the checks against a known-good
#                    device
# Each runs a 2-CPU guest with 2 request queues and, on one backing file:
#   main     bind (virtio-pci + virtio_blk, size, VERSION_1), both queues in
#            use and the write cache on (flush), first/last sector, a
#            verified pattern over the whole disk, discard, write-zeroes,
#            ext4 (mkfs, files, sync, umount, fsck, fstrim), unbind/bind
#            (device reset, new negotiation) and I/O, the disk's hash.
#            The guest powers off, vdevd gets SIGTERM; the backing file must
#            hash the same and hold the tail pattern (what the guest flushed
#            reached the file).
#   crash    (vdevd started again) files there; a file written and flushed;
#            QEMU killed (SIGKILL) with I/O in flight; vdevd must keep
#            running and listening.
#   recover  a new QEMU on the same vdevd: the flushed file is intact, ext4
#            clean, the file again equals the disk after vdevd stops.
#   restart  (vhost-user only) QEMU with a reconnecting chardev; vdevd is
#            killed (SIGKILL) during verified guest I/O and started again;
#            QEMU reconnects and the I/O goes on, every block verified.
E2E_SUITES+=(virtio-blk virtio-blk-qemu)

: "${VDEVD_E2E_VBLK_MB:=64}"   # disk size
: "${VDEVD_E2E_VBLK_ARGS:=}"   # more `vdevd virtio-blk` options, e.g. "--direct"
: "${VDEVD_E2E_VBLK_TRANSPORTS:=vfio-user vhost-user}" # what `virtio-blk` runs
E2E_VBLK_BDF=0000:00:04.0      # where the device sits in the guest
E2E_VBLK_QUEUES=2              # request queues (and guest CPUs)

suite_virtio_blk() {
    local t
    for t in $VDEVD_E2E_VBLK_TRANSPORTS; do
        case "$t" in
            vfio-user | vhost-user) vblk_suite "$t" ;;
            *) e2e_fail "VDEVD_E2E_VBLK_TRANSPORTS: unknown transport '$t' (vfio-user, vhost-user)" ;;
        esac
    done
}
suite_virtio_blk_qemu() { vblk_suite qemu; }

# vblk_device_args BACKEND IMAGE SOCKET [RECONNECT]: QEMU arguments for the
# device under test at E2E_VBLK_BDF.
vblk_device_args() {
    case "$1" in
        qemu)
            printf '%s\n' -blockdev \
                "{\"driver\":\"file\",\"node-name\":\"disk0-file\",\"filename\":\"$2\",\"discard\":\"unmap\"}" \
                -blockdev "{\"driver\":\"raw\",\"node-name\":\"disk0\",\"file\":\"disk0-file\",\"discard\":\"unmap\"}" \
                -device "{\"driver\":\"virtio-blk-pci\",\"drive\":\"disk0\",\"num-queues\":$E2E_VBLK_QUEUES,\"bus\":\"pcie.0\",\"addr\":\"0x4\"}"
            ;;
        vfio-user)
            printf '%s\n' -device "$(e2e_vfio_user_device "$3" 0x4)"
            ;;
        vhost-user)
            printf '%s\n' -chardev "socket,id=vblk0,path=$3${4:+,reconnect-ms=$4}" \
                -device "{\"driver\":\"vhost-user-blk-pci\",\"chardev\":\"vblk0\",\"num-queues\":$E2E_VBLK_QUEUES,\"bus\":\"pcie.0\",\"addr\":\"0x4\"}"
            ;;
    esac
}

vblk_backend_start() { # BACKEND NAME IMAGE SOCKET
    local -a transport
    case "$1" in
        qemu) return 0 ;;
        vfio-user) transport=(--socket "$4") ;;
        vhost-user) transport=(--vhost-user "$4") ;;
    esac
    # shellcheck disable=SC2086 # a list of options
    e2e_vdevd_start "$2" "$4" virtio-blk "${transport[@]}" --image "$3" --queues "$E2E_VBLK_QUEUES" $VDEVD_E2E_VBLK_ARGS
}
vblk_backend_stop() { # BACKEND NAME
    [ "$1" = qemu ] && return 0
    e2e_vdevd_stop "$2"
}

# vblk_check_file VM IMAGE SEED: the backing file holds what guest VM last
# read from its disk, and the tail pattern the host regenerates.
vblk_check_file() {
    local vm=$1 img=$2 seed=$3 want got mib=1048576 size
    want=$(e2e_vm_info "$vm" device-sha256)
    if [ -z "$want" ]; then
        e2e_fail "no disk hash from guest '$vm': cannot check the backing file"
        return 1
    fi
    got=$(sha256sum "$img" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        e2e_fail "backing file differs from what guest '$vm' read from its disk (file $got, guest $want)"
    else
        e2e_host_pass "backing file = disk as guest '$vm' last read it ($got)"
    fi
    size=$(stat -c %s "$img")
    if cmp -s <(e2e_pattern "tail-$seed" $(((size - mib) / 4096)) 256 4096) \
        <(dd if="$img" bs=4096 skip=$(((size - mib) / 4096)) count=256 status=none); then
        e2e_host_pass "backing file holds the guest's tail pattern in its last MiB"
    else
        e2e_fail "the last MiB of the backing file is not the tail pattern the guest wrote"
    fi
}

vblk_suite() {
    local backend=$1 img sock seed size mods="virtio_blk ext4" tag
    local -a dev
    tag=${backend%%-*}
    img=$E2E_RUN_DIR/vblk-$tag.img
    sock=$E2E_RUN_DIR/vblk-$tag.sock
    seed=$RANDOM$RANDOM
    size=$((VDEVD_E2E_VBLK_MB * 1048576))
    truncate -s "$size" "$img"
    mapfile -t dev < <(vblk_device_args "$backend" "$img" "$sock")
    local -a cfg=(E2E_VBLK_BDF="$E2E_VBLK_BDF" E2E_EXPECT_BYTES="$size"
        E2E_EXPECT_QUEUES="$E2E_VBLK_QUEUES" E2E_SEED="$seed")
    # shellcheck disable=SC2034 # read by e2e_vm_start (lib/run.sh)
    local VDEVD_E2E_SMP=$E2E_VBLK_QUEUES
    e2e_say "virtio-blk over $backend"

    # 1. main
    vblk_backend_start "$backend" "$tag-1" "$img" "$sock" || return
    e2e_vm_start "$tag-main" virtio-blk.sh main "$mods" blk 512 "${cfg[@]}" -- "${dev[@]}" || return
    e2e_vm_wait "$tag-main" 900
    e2e_vm_expect "$tag-main" bind queues lba-edges pattern discard write-zeroes ext4 rebind final-state
    vblk_backend_stop "$backend" "$tag-1"
    vblk_check_file "$tag-main" "$img" "$seed"

    # 2. crash: QEMU killed with I/O in flight
    vblk_backend_start "$backend" "$tag-2" "$img" "$sock" || return
    e2e_vm_start "$tag-crash" virtio-blk.sh crash "$mods" blk 512 "${cfg[@]}" -- "${dev[@]}" || return
    if e2e_vm_wait_for "$tag-crash" '^E2E-MARK busy' 300; then
        sleep 2
        e2e_vm_kill "$tag-crash"
        e2e_host_pass "QEMU killed with I/O in flight (after the guest flushed its file)"
    else
        e2e_fail "guest '$tag-crash' never reached the point of I/O in flight"
        e2e_vm_kill "$tag-crash"
    fi
    e2e_vm_expect "$tag-crash" bind persist flush
    if [ "$backend" != qemu ]; then
        sleep 1
        if e2e_is_alive "$tag-2" && e2e_unix_listening "$sock"; then
            e2e_host_pass "vdevd survived its client being killed and still listens"
        else
            e2e_fail "vdevd did not survive its client being killed (alive: $(e2e_is_alive "$tag-2" && echo yes || echo no), listening: $(e2e_unix_listening "$sock" && echo yes || echo no))"
            return
        fi
    fi

    # 3. recover: a new QEMU on the same server
    e2e_vm_start "$tag-recover" virtio-blk.sh recover "$mods" blk 512 "${cfg[@]}" -- "${dev[@]}" || return
    e2e_vm_wait "$tag-recover" 600
    e2e_vm_expect "$tag-recover" bind recover final-state
    vblk_backend_stop "$backend" "$tag-2"
    vblk_check_file "$tag-recover" "$img" "$seed"

    [ "$backend" = vhost-user ] || return 0
    # 4. restart: vdevd killed under I/O and started again; QEMU reconnects.
    mapfile -t dev < <(vblk_device_args "$backend" "$img" "$sock" 1000)
    vblk_backend_start "$backend" "$tag-3" "$img" "$sock" || return
    e2e_vm_start "$tag-restart" virtio-blk.sh restart "$mods" blk 512 "${cfg[@]}" -- "${dev[@]}" || return
    if e2e_vm_wait_for "$tag-restart" '^E2E-MARK ready' 300; then
        sleep 4
        e2e_stop "$tag-3" KILL 1 || true
        e2e_host_pass "vdevd killed (SIGKILL) during guest I/O"
        sleep 1
        vblk_backend_start "$backend" "$tag-4" "$img" "$sock" || return
    else
        e2e_fail "guest '$tag-restart' never got ready for the restart"
    fi
    e2e_vm_wait "$tag-restart" 600
    e2e_vm_expect "$tag-restart" bind survive span resumed final-state
    vblk_backend_stop "$backend" "$tag-4"
    vblk_check_file "$tag-restart" "$img" "$seed"
}
