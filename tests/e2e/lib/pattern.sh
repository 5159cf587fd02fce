# shellcheck shell=bash
# The block pattern of guest/lib.sh, generated on the host: block I of TAG
# is "vdevd-e2e TAG block I", space-padded to BS-1 bytes, then a newline.
# e2e_pattern TAG FIRST COUNT BS
e2e_pattern() {
    local i end=$(($2 + $3)) w=$(($4 - 1))
    for ((i = $2; i < end; i++)); do
        printf "%-${w}s\n" "vdevd-e2e $1 block $i"
    done
}
