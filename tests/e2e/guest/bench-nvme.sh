# shellcheck shell=sh
# Guest side of `bench nvme`: the same fio jobs on each target, interleaved
# (every job runs on every target before the next job), results as
#   E2E-INFO bench <target> <job> <iops> <bandwidth KiB/s>
# Config: E2E_BENCH_TARGETS ("name=BDF" for an NVMe controller or a virtio
# block device at that PCI address, "null" for the guest's null_blk), E2E_BENCH_RUNTIME, E2E_BENCH_RAMP.

# JOBS: name rw bs iodepth
BENCH_JOBS="randread_qd1:randread:4k:1
randread_qd32:randread:4k:32
randwrite_qd32:randwrite:4k:32
seqread_qd8:read:128k:8"

# bench_dev TARGET: the block device of TARGET on stdout.
bench_dev() {
    case "$1" in
        null) echo /dev/nullb0 ;;
        *=*)
            for _d in /sys/bus/pci/devices/"${1#*=}"/virtio*/block/vd*; do
                [ -b "/dev/${_d##*/}" ] && echo "/dev/${_d##*/}" && return 0
            done
            for _c in /sys/bus/pci/devices/"${1#*=}"/nvme/nvme*; do
                for _n in "$_c/${_c##*/}"n*; do
                    [ -b "/dev/${_n##*/}" ] && echo "/dev/${_n##*/}" && return 0
                done
            done
            return 1
            ;;
    esac
}

check_devices() {
    for t in $E2E_BENCH_TARGETS; do
        [ "$t" = null ] || wait_for 60 bench_dev "$t" >/dev/null || die "no block device for target $t"
        info "bench-device ${t%%=*} $(bench_dev "$t")"
    done
}

run_job() { # run_job TARGET DEV JOB RW BS QD
    fio --name="$3" --filename="$2" --direct=1 --ioengine=libaio --rw="$4" --bs="$5" --iodepth="$6" \
        --time_based --runtime="$E2E_BENCH_RUNTIME" --ramp_time="$E2E_BENCH_RAMP" \
        --norandommap --randrepeat=0 --output-format=terse --terse-version=3 >"/tmp/fio-$1-$3.txt" ||
        die "fio $3 on $1 failed: $(cat "/tmp/fio-$1-$3.txt")"
    # terse v3: field 5 error, 7/8 read KiB/s and IOPS, 48/49 the same for writes
    awk -F';' -v t="$1" -v j="$3" -v rw="$4" '
        $5 != 0 { exit 1 }
        { if (rw ~ /write/) { bw = $48; io = $49 } else { bw = $7; io = $8 }
          printf "bench %s %s %s %s\n", t, j, io, bw }' "/tmp/fio-$1-$3.txt" >/tmp/line ||
        die "fio $3 on $1 reported an error: $(cat "/tmp/fio-$1-$3.txt")"
    info "$(cat /tmp/line)"
}

check_bench() {
    echo "$BENCH_JOBS" | while IFS=: read -r job rw bs qd; do
        for t in $E2E_BENCH_TARGETS; do
            run_job "${t%%=*}" "$(bench_dev "$t")" "$job" "$rw" "$bs" "$qd"
        done
    done
}

phase_bench() {
    case " $E2E_BENCH_TARGETS " in
        *" null "*)
            modprobe null_blk nr_devices=1 gb=1 bs=4096 queue_mode=2 irqmode=0 submit_queues=1 hw_queue_depth=64 ||
                fail modprobe-null_blk "modprobe null_blk failed"
            ;;
    esac
    check devices check_devices || return 0
    check bench check_bench
}
