#!/usr/bin/env bash
# Stop the harness LemonLDAP::NG instance started by setup.sh.
# Kills exactly the PIDs recorded in $LLNG_HOME/run/pids (nginx master and
# llng-fastcgi-server manager; each takes its own workers down), after checking
# that each PID still belongs to the expected program.
set -uo pipefail

LLNG_HOME="${LLNG_HOME:-${TMPDIR:-/tmp}/parvis-lemonldap}"
PIDS="$LLNG_HOME/run/pids"

if [ ! -f "$PIDS" ]; then
    echo "stop.sh: no $PIDS, nothing to stop"
    exit 0
fi

alive() { kill -0 "$1" 2>/dev/null; }

# expected command-line fragment for each recorded name
matches() {
    local name=$1 pid=$2 cmd
    cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || return 1
    case "$name" in
        nginx)               [[ "$cmd" == *nginx* ]] ;;
        llng-fastcgi-server) [[ "$cmd" == *llng-fastcgi-server* ]] ;;
        *) return 1 ;;
    esac
}

declare -a killed=()
while read -r name pid; do
    [ -n "${pid:-}" ] || continue
    if alive "$pid" && matches "$name" "$pid"; then
        # remember the workers too, in case the parent has to be KILLed
        for c in $(ps -o pid= --ppid "$pid" 2>/dev/null); do killed+=("$name:$c"); done
        echo "stop.sh: TERM $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null
        killed+=("$name:$pid")
    else
        echo "stop.sh: $name (pid $pid) not running"
    fi
done < "$PIDS"

for entry in "${killed[@]-}"; do
    [ -n "$entry" ] || continue
    name=${entry%%:*}; pid=${entry##*:}
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid" && matches "$name" "$pid"; then
        echo "stop.sh: $name (pid $pid) still alive, sending KILL"
        kill -KILL "$pid" 2>/dev/null
    fi
done

rm -f "$PIDS" "$LLNG_HOME/run/llng-fastcgi.sock"
echo "stop.sh: stopped"
