#!/usr/bin/env bash
# Build every manifest entry into OUTDIR the way the Rust harness does:
# cwd = OUTDIR, sources referenced by their path in the corpus directory,
# binary named after the entry, extra libraries built into OUTDIR.
# Usage: build.sh OUTDIR [ENTRY...]
set -euo pipefail

corpus=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR [ENTRY...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$out"

want() { [ $# -eq 1 ] && return 0; for w in "${@:2}"; do [ "$w" = "$1" ] && return 0; done; return 1; }

status=0
while IFS='|' read -r name compiler cflags sources extra; do
    case "$name" in ''|'#'*) continue ;; esac
    want "$name" "$@" || continue
    case "$compiler" in
        musl) cc=(musl-gcc -static) ;;
        glibc-static) cc=(gcc -static) ;;
        glibc) cc=(gcc) ;;
        *) echo "build.sh: $name: unknown compiler '$compiler'" >&2; exit 1 ;;
    esac
    srcs=()
    for s in $sources; do srcs+=("$corpus/$s"); done

    IFS=';' read -ra items <<<"$extra"
    for item in "${items[@]}"; do
        case "$item" in
            lib=*)
                IFS=':' read -r lout lsrc lflags <<<"${item#lib=}"
                # shellcheck disable=SC2086  # flags are meant to split
                gcc $lflags -o "$lout" "$corpus/$lsrc" || status=1
                ;;
        esac
    done
    # shellcheck disable=SC2086
    if "${cc[@]}" $cflags -o "$name" "${srcs[@]}"; then
        echo "built $name"
    else
        echo "build.sh: FAILED $name" >&2
        status=1
    fi
done <"$corpus/manifest.txt"
exit $status
