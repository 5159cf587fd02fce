# shellcheck shell=bash
# NVMe suites. One check list (guest/nvme.sh), two controllers:
#   nvme        vdevd's NVMe controller over vfio-user:
#               `vdevd nvme --socket S --image FILE`, QEMU's vfio-user-pci
#   nvme-qemu   QEMU's built-in `-device nvme` on the same kind of backing
#               file: proves the guest checks and the durability checks
#               against a known-good controller
# Three guest boots on one backing file:
#   main     bind, identify, first/last LBA, whole-namespace pattern, discard,
#            write-zeroes, ext4 (mkfs, files, sync, umount, fsck), controller
#            reset through sysfs and I/O after it, unbind/bind and I/O after
#            it, then a hash of the whole namespace.
#            The guest powers off; vdevd is stopped (SIGTERM); the backing file
#            must hash the same and hold the tail pattern.
#   crash    (vdevd started again) the files are there; a file is written and
#            flushed; with I/O in flight QEMU is killed (SIGKILL). vdevd must
#            keep running and keep its socket.
#   recover  a new QEMU on the same vdevd: the flushed data is there and
#            the file system is clean after journal replay; the namespace
#            hash again matches the file after vdevd stops.
E2E_SUITES+=(nvme-qemu nvme)

: "${VDEVD_E2E_NVME_MB:=64}"        # namespace size
: "${VDEVD_E2E_NVME_ARGS:=}"         # more `vdevd nvme` options, e.g. "--direct --queues 2"
E2E_NVME_BDF=0000:00:04.0            # where the controller sits in the guest

suite_nvme() { nvme_suite vdevd; }
suite_nvme_qemu() { nvme_suite qemu; }

# nvme_device_args BACKEND IMAGE SOCKET: QEMU arguments for the controller
# under test at E2E_NVME_BDF.
nvme_device_args() {
    case "$1" in
        qemu)
            # Writeback cache with flushes honoured (QEMU's default): a guest
            # flush reaches the file with fdatasync; discards punch holes.
            printf '%s\n' -blockdev \
                "{\"driver\":\"file\",\"node-name\":\"disk0-file\",\"filename\":\"$2\",\"discard\":\"unmap\"}" \
                -blockdev "{\"driver\":\"raw\",\"node-name\":\"disk0\",\"file\":\"disk0-file\",\"discard\":\"unmap\"}" \
                -device "{\"driver\":\"nvme\",\"serial\":\"e2e-qemu-nvme\",\"drive\":\"disk0\",\"bus\":\"pcie.0\",\"addr\":\"0x4\"}"
            ;;
        vdevd)
            printf '%s\n' -device "$(e2e_vfio_user_device "$3" 0x4)"
            ;;
    esac
}

nvme_backend_start() { # BACKEND NAME IMAGE SOCKET
    [ "$1" = vdevd ] || return 0
    # shellcheck disable=SC2086 # a list of options
    e2e_vdevd_start "$2" "$4" nvme --socket "$4" --image "$3" $VDEVD_E2E_NVME_ARGS
}
nvme_backend_stop() { # BACKEND NAME
    [ "$1" = vdevd ] || return 0
    e2e_vdevd_stop "$2"
}

# nvme_check_file VM IMAGE SEED: the backing file holds what guest VM last
# read back from its namespace (hash of the whole namespace), and the tail
# pattern the host can regenerate on its own.
nvme_check_file() {
    local vm=$1 img=$2 seed=$3 want got mib=1048576 size
    want=$(e2e_vm_info "$vm" device-sha256)
    if [ -z "$want" ]; then
        e2e_fail "no namespace hash from guest '$vm': cannot check the backing file"
        return 1
    fi
    got=$(sha256sum "$img" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        e2e_fail "backing file differs from what guest '$vm' read from its namespace (file $got, guest $want)"
    else
        e2e_host_pass "backing file = namespace as guest '$vm' last read it ($got)"
    fi
    size=$(stat -c %s "$img")
    if cmp -s <(e2e_pattern "tail-$seed" $(((size - mib) / 4096)) 256 4096) \
        <(dd if="$img" bs=4096 skip=$(((size - mib) / 4096)) count=256 status=none); then
        e2e_host_pass "backing file holds the guest's tail pattern in its last MiB"
    else
        e2e_fail "the last MiB of the backing file is not the tail pattern the guest wrote"
    fi
}

nvme_suite() {
    local backend=$1 img sock seed size mods="nvme ext4"
    local -a dev
    img=$E2E_RUN_DIR/nvme.img
    sock=$E2E_RUN_DIR/nvme.sock
    seed=$RANDOM$RANDOM
    size=$((VDEVD_E2E_NVME_MB * 1048576))
    truncate -s "$size" "$img"
    mapfile -t dev < <(nvme_device_args "$backend" "$img" "$sock")
    local -a cfg=(E2E_NVME_BDF="$E2E_NVME_BDF" E2E_EXPECT_BYTES="$size" E2E_SEED="$seed")

    # 1. main
    nvme_backend_start "$backend" vdevd-1 "$img" "$sock" || return
    e2e_vm_start main nvme.sh main "$mods" blk 512 "${cfg[@]}" -- "${dev[@]}" || return
    e2e_vm_wait main 900
    e2e_vm_expect main bind identify lba-edges pattern discard write-zeroes ext4 reset rebind final-state
    nvme_backend_stop "$backend" vdevd-1
    nvme_check_file main "$img" "$seed"

    # 2. crash: QEMU killed with I/O in flight
    nvme_backend_start "$backend" vdevd-2 "$img" "$sock" || return
    e2e_vm_start crash nvme.sh crash "$mods" blk 512 "${cfg[@]}" -- "${dev[@]}" || return
    if e2e_vm_wait_for crash '^E2E-MARK busy' 300; then
        sleep 2
        e2e_vm_kill crash
        e2e_host_pass "QEMU killed with I/O in flight (after the guest flushed its file)"
    else
        e2e_fail "guest 'crash' never reached the point of I/O in flight"
        e2e_vm_kill crash
    fi
    e2e_vm_expect crash bind persist flush
    if [ "$backend" = vdevd ]; then
        sleep 1
        if e2e_is_alive vdevd-2 && e2e_unix_listening "$sock"; then
            e2e_host_pass "vdevd survived its client being killed and still listens"
        else
            e2e_fail "vdevd did not survive its client being killed (alive: $(e2e_is_alive vdevd-2 && echo yes || echo no), listening: $(e2e_unix_listening "$sock" && echo yes || echo no))"
            return
        fi
    fi

    # 3. recover: a new QEMU on the same server
    e2e_vm_start recover nvme.sh recover "$mods" blk 512 "${cfg[@]}" -- "${dev[@]}" || return
    e2e_vm_wait recover 600
    e2e_vm_expect recover bind recover final-state
    nvme_backend_stop "$backend" vdevd-2
    nvme_check_file recover "$img" "$seed"
}
