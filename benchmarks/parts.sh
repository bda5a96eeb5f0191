# Sourced by the GPU scripts: `part NAME SECONDS command...` runs one part under its own timeout, so one failure
# keeps the other parts' results. Its output goes to $out/$PART_PREFIX$NAME.log (the last ${TAIL:-25} lines are
# printed) and a status line (name, exit code, seconds) is added to `status`, which the script prints last.
status=()

part() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS log="$out/$PART_PREFIX$name.log"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  status+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  tail -"${TAIL:-25}" "$log"
}
