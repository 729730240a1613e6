#!/usr/bin/env bash
# Run the test suite (or the pytest arguments given) with every process's wall clock moved
# forward to the next HH:MM UTC, as Debian's faketime does, one offset shared by all of them
# (the suite's PostgreSQL included):
#
#   scripts/suite_at.sh 03:30 [pytest arguments...]
#
# Needs libfaketime (Debian: faketime; its thread-safe build) and gcc. Why not plain `faketime -f +SECONDS`:
# libfaketime 0.9.10 fakes the monotonic clock too, and Python 3.11's timed waits
# (Event.wait, Lock.acquire with a timeout, Queue.get) pass a faked monotonic deadline to
# sem_clockwait, which it does not intercept: they wait the whole offset (hours). With
# FAKETIME_DONT_FAKE_MONOTONIC=1 those work, but its clock_nanosleep then shifts monotonic
# deadlines by the offset and time.sleep fails with EINVAL; the small shim below sends
# monotonic sleeps straight to the kernel. Even so, libfaketime at times crashes the asyncio
# thread of the SMTP server in tests/test_alerts.py (a segfault in about half of the runs
# here, either build of the library): run that file again on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
at="${1:?usage: scripts/suite_at.sh HH:MM [pytest arguments...]}"
shift
libfaketime=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1
[[ -e $libfaketime ]] || { echo "suite_at: $libfaketime not found (apt install faketime)" >&2; exit 2; }
offset=$(.venv/bin/python - "$at" <<'EOF'
import sys
from datetime import UTC, datetime, timedelta

try:
    hour, minute = map(int, sys.argv[1].split(":"))
    now = datetime.now(UTC)
    target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
except ValueError:
    sys.exit(f"suite_at: the time must be HH:MM, got {sys.argv[1]!r}")
print(int(((target if target > now else target + timedelta(days=1)) - now).total_seconds()))
EOF
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/shim.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int clock_nanosleep(clockid_t id, int flags, const struct timespec *req, struct timespec *rem) {
    if (id != CLOCK_REALTIME) {
        long r = syscall(SYS_clock_nanosleep, id, flags, req, rem);
        return r == 0 ? 0 : errno;
    }
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);
    if (!next) next = dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(id, flags, req, rem);
}
EOF
gcc -shared -fPIC -O2 -o "$work/shim.so" "$work/shim.c" -ldl
echo "suite_at: clocks moved +${offset}s, to $(date -u -d "@$(( $(date +%s) + offset ))" '+%Y-%m-%d %H:%M UTC')"
LD_PRELOAD="$work/shim.so:$libfaketime" FAKETIME="+${offset}s" FAKETIME_DONT_FAKE_MONOTONIC=1 \
    .venv/bin/pytest -p no:cacheprovider --basetemp="$work/pytest" "$@"
