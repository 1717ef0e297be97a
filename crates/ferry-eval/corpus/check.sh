#!/usr/bin/env bash
# Build the corpus, then for every entry:
#   1. run the full protocol natively: wait for "ready", check the process is
#      parked in a blocking syscall, send SIGUSR1, expect result + exit 0;
#   2. under qemu-x86_64 -cpu MODEL for each model, run with FERRY_NOWAIT=1
#      and FERRY_FORCE=<native decision>, and compare with the native output.
# Prints a table, rows = CPU models, columns = entries:
#   ok    same output, exit 0          DIFF  exit 0 but different output
#   ILL   SIGILL after "ready"         ILL*  SIGILL before "ready" (setup)
#   SIGn / rcN / TIME                  other signal / exit code / timeout
# With -a, every decision listed in the manifest gets its own column
# (entry:decision), forced both natively and under qemu; every path of an
# entry must print the same result natively.
# Usage: check.sh [-a] [-o BUILDDIR] [ENTRY...]  (env MODELS overrides models)
set -uo pipefail

corpus=$(cd "$(dirname "$0")" && pwd)
out=
all=0
while [ $# -gt 0 ]; do
    case "$1" in
        -a) all=1; shift ;;
        -o) out=$2; shift 2 ;;
        *) break ;;
    esac
done
if [ -z "$out" ]; then
    out=$(mktemp -d /tmp/ferry-corpus.XXXXXX)
fi
"$corpus/build.sh" "$out" "$@" >/dev/null || { echo "check.sh: build failed" >&2; exit 1; }
out=$(cd "$out" && pwd)
cd "$out"

qemu=${QEMU:-$(command -v qemu-x86_64 || command -v qemu-x86_64-static || true)}
[ -n "$qemu" ] || { echo "check.sh: no qemu-x86_64 found" >&2; exit 1; }
models=${MODELS:-"Nehalem-v1 SandyBridge-v1 IvyBridge-v1 Haswell-v1 Broadwell-v1
 Skylake-Client-v1 Skylake-Server-v1 Cascadelake-Server-v1 Icelake-Server-v1
 EPYC-v1 EPYC-Rome-v1 EPYC-Milan-v1 qemu64 max"}
ulimit -c 0  # qemu dumps a core for every guest SIGILL otherwise
export FERRY_LIBDIR=$out

# Columns: "entry" (native decision) or, with -a, "entry:decision".
entries=()
while IFS='|' read -r name _c _f _s extra; do
    case "$name" in ''|'#'*) continue ;; esac
    if [ $# -gt 0 ]; then
        keep=0
        for w in "$@"; do [ "$w" = "$name" ] && keep=1; done
        [ $keep = 1 ] || continue
    fi
    if [ $all = 1 ]; then
        decs=$(sed -n 's/.*decisions=\([^;]*\).*/\1/p' <<<"$extra")
        for d in ${decs//,/ }; do entries+=("$name:$d"); done
    else
        entries+=("$name")
    fi
done <"$corpus/manifest.txt"

# Native protocol run of entry $1, forcing decision $2 if non-empty.
# Sets: native_status, decision, expect (full stdout).
native_run() {
    local bin=./$1 log=$out/$1.native.out pid state i
    : >"$log"
    if [ -n "$2" ]; then
        FERRY_FORCE=$2 "$bin" >"$log" 2>"$out/$1.native.err" &
    else
        "$bin" >"$log" 2>"$out/$1.native.err" &
    fi
    pid=$!
    for ((i = 0; i < 500; i++)); do
        grep -q '^ready dispatch=' "$log" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.01
    done
    decision=$(sed -n 's/^ready dispatch=//p' "$log")
    if [ -z "$decision" ]; then
        kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
        native_status=noready; return
    fi
    sleep 0.1  # let it reach sigwait
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)
    if [ "$state" != S ] || grep -q '^result=' "$log"; then
        kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
        native_status=nowait; return
    fi
    kill -USR1 "$pid"
    wait "$pid"
    local rc=$?
    expect=$(cat "$log")
    if [ $rc -ne 0 ]; then native_status=rc$rc
    elif [ "$(grep -c . "$log")" -ne 2 ] || ! grep -q '^result=' "$log"; then native_status=badout
    else native_status=ok
    fi
}

# One qemu run; prints the cell.
qemu_cell() {
    local name=$1 model=$2 dec=$3 expect=$4 got rc
    got=$(FERRY_NOWAIT=1 FERRY_FORCE=$dec timeout 120 "$qemu" -cpu "$model" "./$name" 2>/dev/null)
    rc=$?
    if [ $rc -eq 0 ]; then
        [ "$got" = "$expect" ] && echo ok || echo DIFF
    elif [ $rc -eq 124 ]; then echo TIME
    elif [ $rc -eq 132 ]; then
        case "$got" in "ready dispatch="*) echo ILL ;; *) echo 'ILL*' ;; esac
    elif [ $rc -gt 128 ]; then echo "SIG$((rc - 128))"
    else echo "rc$rc"
    fi
}

declare -A cell first
for e in "${entries[@]}"; do
    name=${e%%:*}
    force=
    [ "$name" != "$e" ] && force=${e#*:}
    native_run "$name" "$force"
    cell[native,$e]=$native_status
    cell[decision,$e]=${decision:--}
    # All paths of one entry must agree natively (the result must not
    # depend on the dispatch decision).
    if [ "$native_status" = ok ]; then
        if [ -z "${first[$name]:-}" ]; then
            first[$name]=$(grep '^result=' <<<"$expect")
        elif [ "${first[$name]}" != "$(grep '^result=' <<<"$expect")" ]; then
            cell[native,$e]=pathdiff
        fi
    fi
    for m in $models; do
        if [ "$native_status" = ok ]; then
            cell[$m,$e]=$(qemu_cell "$name" "$m" "$decision" "$expect")
        else
            cell[$m,$e]=-
        fi
    done
done

printf '%-22s' "model \\ entry"
for e in "${entries[@]}"; do printf ' %-*s' $((${#e} > 6 ? ${#e} : 6)) "$e"; done
echo
for row in decision native $models; do
    printf '%-22s' "$row"
    for e in "${entries[@]}"; do printf ' %-*s' $((${#e} > 6 ? ${#e} : 6)) "${cell[$row,$e]}"; done
    echo
done
echo "(build dir: $out)"
