#!/usr/bin/env bash
# The README's demo: vfiod on a simulated workstation (Intel iGPU with the console, NVIDIA L4 + its HDMI
# audio in one IOMMU group), on a private D-Bus of its own, driven through busctl the way hypeman's
# lib/devices README walks it: discover -> register -> attach (with include_group) -> the cloud-hypervisor
# device config -> detach; then GPU sharing on a simulated vGPU server (two NVIDIA L40S): ListProfiles ->
# AttachVGPU twice -> the QEMU and cloud-hypervisor device lines -> Detach. Every call is printed before its
# reply. Nothing outside a temporary directory
# is touched (no real /sys, no system bus); everything started here is stopped on exit.
#
# Exit status: 0 when every step gave the expected result, 1 otherwise (the script still runs to the end).
# Environment: VFIOD, VFIOCTL, PYTHON override the programs used (default: the repo's .venv).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VFIOD=${VFIOD:-$REPO/.venv/bin/vfiod}
VFIOCTL=${VFIOCTL:-$REPO/.venv/bin/vfioctl}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
NAME=org.hypeman.Devices1
MANAGER=(org.hypeman.Devices1 /org/hypeman/Devices1 org.hypeman.Devices1.Manager)
GPU=0000:a2:00.0
AUDIO=0000:a2:00.1

for tool in dbus-daemon busctl "$VFIOD" "$VFIOCTL"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "demo: $tool is missing (run \`make deps\` first)" >&2
    exit 1
  fi
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/vfiod-demo.XXXXXX")
BUS_PID=
VFIOD_PID=
FAILED=()

stop() {
  local pid=$1 i
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  stop "$VFIOD_PID"
  stop "$BUS_PID"
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----- output helpers ------------------------------------------------------------------------------------

STEP=0
step() {
  STEP=$((STEP + 1))
  if [[ -t 1 ]]; then
    printf '\n\033[1m== %d. %s\033[0m\n' "$STEP" "$*"
  else
    printf '\n== %d. %s\n' "$STEP" "$*"
  fi
}

# Show an argv the way one would type it; the bus address is shown as $ADDR (exported below).
PLAIN_ARG='^[A-Za-z0-9_./:=@,+{}-]+$'
show_cmd() {
  local out="" arg
  for arg in "$@"; do
    if [[ $arg == "$ADDR" ]]; then
      arg='"$ADDR"'
    elif [[ $arg == --address=* ]]; then
      arg='--address="$ADDR"'
    elif [[ ! $arg =~ $PLAIN_ARG ]]; then
      arg="'${arg//\'/\'\\\'\'}'"
    fi
    out+="$arg "
  done
  printf '$ %s\n' "${out% }"
}

# run CMD...: print it, run it, print what it said. Sets OUT (stdout+stderr) and RC; never exits.
run() {
  show_cmd "$@"
  set +e
  OUT=$("$@" 2>&1)
  RC=$?
  set -e
  [[ -n $OUT ]] && printf '%s\n' "$OUT"
  return 0
}

ok() { printf '   ok: %s\n' "$*"; }
fail() {
  printf '   FAILED: %s\n' "$*"
  FAILED+=("step $STEP: $*")
}
expect_rc() { # expect_rc WANT what
  if [[ $RC == "$1" ]]; then ok "$2 (exit $RC)"; else fail "$2: expected exit $1, got $RC"; fi
}
expect_in() { # expect_in TEXT what
  if [[ $OUT == *"$1"* ]]; then ok "$2"; else fail "$2: the reply does not contain $1"; fi
}

# ----- a private bus and vfiod on it ---------------------------------------------------------------------

step "Start a private D-Bus and vfiod on a simulated workstation"
cat >"$TMP/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir=$TMP</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
EOF
dbus-daemon --config-file="$TMP/bus.conf" --nofork --print-address=3 3>"$TMP/address" 2>"$TMP/bus.log" &
BUS_PID=$!
for ((i = 0; i < 100; i++)); do
  [[ -s $TMP/address ]] && break
  kill -0 "$BUS_PID" 2>/dev/null || break
  sleep 0.05
done
ADDR=$(head -n1 "$TMP/address" 2>/dev/null || true)
if [[ -z $ADDR ]]; then
  echo "demo: dbus-daemon did not start:" >&2
  cat "$TMP/bus.log" >&2
  exit 1
fi
export ADDR
echo "ADDR=$ADDR"
# start_vfiod PROFILE STATE_DIR: vfiod on the simulated PROFILE, on the bus, until it owns its name.
start_vfiod() {
  local i
  show_cmd "$VFIOD" run --bus "$ADDR" --simulate "$1" --state-dir "$2"
  "$VFIOD" run --bus "$ADDR" --simulate "$1" --state-dir "$2" >>"$TMP/vfiod.log" 2>&1 &
  VFIOD_PID=$!
  for ((i = 0; i < 150; i++)); do
    busctl --address="$ADDR" status "$NAME" >/dev/null 2>&1 && break
    if ! kill -0 "$VFIOD_PID" 2>/dev/null; then
      echo "demo: vfiod exited before it was on the bus:" >&2
      cat "$TMP/vfiod.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  if ! busctl --address="$ADDR" status "$NAME" >/dev/null 2>&1; then
    echo "demo: $NAME did not appear on the bus within 15 s; vfiod said:" >&2
    cat "$TMP/vfiod.log" >&2
    exit 1
  fi
  ok "$NAME is on the bus (vfiod pid $VFIOD_PID, simulating $1)"
}
start_vfiod workstation-l4 "$TMP/state"

BUSCTL=(busctl --address="$ADDR")

# ----- the seed's workflow ---------------------------------------------------------------------------------

step "Is this host ready for passthrough? (GetHostStatus)"
run "${BUSCTL[@]}" call "${MANAGER[@]}" GetHostStatus 'a{sv}' 0
expect_rc 0 "GetHostStatus answered"
expect_in '"iommu_enabled" b true' "the IOMMU is on"

step "Discover the GPUs (ListAvailable)"
run "${BUSCTL[@]}" call "${MANAGER[@]}" ListAvailable 'a{sv}' 0
expect_rc 0 "ListAvailable answered"
expect_in "\"$GPU\"" "the L4 at $GPU is a candidate"

step "Register the L4 as l4-gpu (RegisterDevice: its driver is not touched)"
run "${BUSCTL[@]}" call "${MANAGER[@]}" RegisterDevice 'ssa{sv}' "$GPU" l4-gpu 0
expect_rc 0 "RegisterDevice answered"
DEVICE_PATH=$(awk '{ gsub(/"/, "", $2); print $2; exit }' <<<"$OUT")
if [[ $DEVICE_PATH == /org/hypeman/Devices1/devices/* ]]; then
  ok "the device object is $DEVICE_PATH"
else
  fail "no device object path in the reply"
  DEVICE_PATH=/org/hypeman/Devices1/devices/unknown
fi

step "Attach it to instance ml-training WITHOUT include_group: its HDMI audio shares the IOMMU group"
run "${BUSCTL[@]}" --timeout=120 call "${MANAGER[@]}" Attach 'sasa{sv}' ml-training 1 l4-gpu 0
if [[ $RC != 0 ]]; then ok "refused (busctl exit $RC)"; else fail "Attach without include_group succeeded"; fi
echo "   The same call through vfioctl shows the error name and its exit status:"
run "$VFIOCTL" --address="$ADDR" attach ml-training l4-gpu
expect_rc 5 "vfioctl exits 5, the conflict class"
expect_in "IOMMUGroupConflict" "the error is org.hypeman.Devices1.Error.IOMMUGroupConflict"
expect_in "$AUDIO" "it names the other member, $AUDIO"

step "Attach with include_group: the audio function is bound with it"
run "${BUSCTL[@]}" --timeout=120 --json=short call "${MANAGER[@]}" Attach 'sasa{sv}' ml-training 1 l4-gpu 1 include_group b true
expect_rc 0 "Attach answered"
FIRST_ATTACH=$OUT

step "The device object's properties"
run "${BUSCTL[@]}" introspect --no-pager "$NAME" "$DEVICE_PATH" org.hypeman.Devices1.Device
expect_rc 0 "introspect answered"
expect_in '"vfio-pci"' "Driver is vfio-pci"
expect_in '"attached"' "State is attached"

step "cloud-hypervisor device config (one --device per attachment)"
set +e
CH=$("$PYTHON" "$REPO/tools/demo_replies.py" ch "$FIRST_ATTACH")
CH_RC=$?
set -e
printf '%s\n' "$CH"
OUT=$CH
if [[ $CH_RC == 0 ]]; then ok "parsed the Attach reply"; else fail "could not parse the Attach reply"; fi
expect_in "--device path=/sys/bus/pci/devices/$GPU/" "the GPU's --device line"
expect_in "--device path=/sys/bus/pci/devices/$AUDIO/" "the audio function's --device line"

step "Attach again (what hypeman does on start): idempotent, same attachments"
run "${BUSCTL[@]}" --timeout=120 --json=short call "${MANAGER[@]}" Attach 'sasa{sv}' ml-training 1 l4-gpu 1 include_group b true
expect_rc 0 "the repeated Attach succeeded"
if "$PYTHON" -c '
import json, sys
a, b = (json.loads(x)["data"][0] for x in sys.argv[1:])
bare = lambda rs: [{k: v for k, v in r.items() if k != "changed"} for r in rs]
made = lambda rs: [r["changed"]["data"] for r in rs]
sys.exit(not (bare(a) == bare(b) and all(made(a)) and not any(made(b))))' \
  "$FIRST_ATTACH" "$OUT" 2>/dev/null; then
  ok "the same attachment records as the first Attach, each with changed false"
else
  fail "the repeated Attach returned different attachments"
fi

step "Detach everything of ml-training: each function goes back to its own driver"
run "${BUSCTL[@]}" --timeout=120 call "${MANAGER[@]}" Detach 'sasa{sv}' ml-training 0 0
expect_rc 0 "Detach answered"

step "Both functions are back on the host drivers (ListDevices)"
run "${BUSCTL[@]}" call "${MANAGER[@]}" ListDevices 'a{sv}' 0
expect_rc 0 "ListDevices answered"
expect_in '"driver" s "nvidia"' "$GPU is on nvidia"
expect_in '"driver" s "snd_hda_intel"' "$AUDIO is on snd_hda_intel"
if [[ $OUT == *'"driver" s "vfio-pci"'* ]]; then fail "a device is still on vfio-pci"; fi

step "The same through vfioctl"
run "$VFIOCTL" --address="$ADDR" list
expect_rc 0 "vfioctl list"
expect_in "nvidia" "vfioctl shows l4-gpu on nvidia"

# ----- GPU sharing: NVIDIA vGPU profiles -------------------------------------------------------------------

step "GPU sharing: vfiod on a simulated vGPU server (two NVIDIA L40S, 32 VFs each, NVIDIA's vendor-specific VFIO)"
stop "$VFIOD_PID"
start_vfiod l40s-vgpu "$TMP/state-vgpu"

step "vGPU readiness (GetHostStatus: gpu_mode, vgpu_slots_*)"
run "${BUSCTL[@]}" call "${MANAGER[@]}" GetHostStatus 'a{sv}' 0
expect_rc 0 "GetHostStatus answered"
expect_in '"gpu_mode" s "vgpu"' "gpu_mode is vgpu"
expect_in '"vgpu_slots_used" u 0' "no vGPU is in use"

step "The profiles this host offers (ListProfiles, through vfioctl)"
run "$VFIOCTL" --address="$ADDR" profiles
expect_rc 0 "vfioctl profiles"
expect_in "NVIDIA L40S-4Q" "the L40S-4Q profile is offered"

VM_A_UUID=5a0d1f58-3c3a-4b8e-9a55-2f1d8e6b0a01
VM_B_UUID=5a0d1f58-3c3a-4b8e-9a55-2f1d8e6b0a02
step "AttachVGPU twice: an L40S-4Q for vm-a and one for vm-b, each with the uuid its VM will carry"
run "${BUSCTL[@]}" --timeout=120 --json=short call "${MANAGER[@]}" AttachVGPU 'ssa{sv}' vm-a 'NVIDIA L40S-4Q' 1 uuid s "$VM_A_UUID"
expect_rc 0 "AttachVGPU for vm-a answered"
VGPU_A=$OUT
run "${BUSCTL[@]}" --timeout=120 --json=short call "${MANAGER[@]}" AttachVGPU 'ssa{sv}' vm-b 'NVIDIA L40S-4Q' 1 uuid s "$VM_B_UUID"
expect_rc 0 "AttachVGPU for vm-b answered"
VGPU_B=$OUT

step "The VMM command lines for each vGPU (QEMU and cloud-hypervisor)"
set +e
LINES=$("$PYTHON" "$REPO/tools/demo_replies.py" vgpu "vm-a=$VGPU_A" "vm-b=$VGPU_B")
LINES_RC=$?
set -e
printf '%s\n' "$LINES"
OUT=$LINES
if [[ $LINES_RC == 0 ]]; then ok "parsed the AttachVGPU replies"; else fail "could not parse the AttachVGPU replies"; fi
expect_in "-uuid $VM_A_UUID" "vm-a's QEMU carries its uuid"
expect_in "-device vfio-pci,sysfsdev=/sys/bus/pci/devices/" "QEMU's sysfsdev= is the VF"
expect_in "--device path=/sys/bus/pci/devices/" "cloud-hypervisor's --device path="

step "Two vGPU slots are used, one on each GPU (least loaded first)"
run "${BUSCTL[@]}" call "${MANAGER[@]}" GetHostStatus 'a{sv}' 0
expect_in '"vgpu_slots_used" u 2' "vgpu_slots_used is 2"
run "$VFIOCTL" --address="$ADDR" vgpus
expect_rc 0 "vfioctl vgpus"
expect_in "0000:a2:" "one vGPU is on the GPU at a2"
expect_in "0000:b3:" "the other is on the GPU at b3"

step "Detach both: the vGPUs are destroyed, the slots come back"
run "${BUSCTL[@]}" --timeout=120 call "${MANAGER[@]}" Detach 'sasa{sv}' vm-a 0 0
expect_rc 0 "Detach vm-a answered"
run "${BUSCTL[@]}" --timeout=120 call "${MANAGER[@]}" Detach 'sasa{sv}' vm-b 0 0
expect_rc 0 "Detach vm-b answered"
run "${BUSCTL[@]}" call "${MANAGER[@]}" GetHostStatus 'a{sv}' 0
expect_in '"vgpu_slots_used" u 0' "vgpu_slots_used is 0 again"

# ----- result ---------------------------------------------------------------------------------------------

echo
if ((${#FAILED[@]})); then
  echo "demo: ${#FAILED[@]} expectation(s) failed:"
  printf '  - %s\n' "${FAILED[@]}"
  echo "vfiod's log:"
  sed 's/^/  | /' "$TMP/vfiod.log"
  exit 1
fi
echo "demo: every step gave the expected result; stopping vfiod and the bus."
