#!/usr/bin/env bash
# vk-validate.sh COMMAND...: runs a command on Vulkan under the Khronos validation layer (Debian's
# vulkan-validationlayers) with synchronization validation and best practices on, and fails on any
# validation error or synchronization hazard the layer reports, or when the layer did not report at
# all (lavapipe always draws two best-practices warnings, one about the instance and one about the
# device: none means the layer never loaded, none about a device that it validated no Vulkan device).
# Prints the counts and every message but the known best-practices ones; the command's own output is
# kept in a log beside them. WGPU_VALIDATION=1 makes wgpu load the layer; the settings file
# (scripts/vulkan-validation/vk_layer_settings.txt) sends its messages to stdout.
#
#   scripts/vk-validate.sh target/release/mnist-wgpu verify --batch-size 8 --adapter llvmpipe:vulkan
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
if ! ls /usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json >/dev/null 2>&1; then
  echo "error: the Khronos validation layer is not installed (sudo apt-get install -y vulkan-validationlayers)" >&2
  exit 1
fi
log="$(mktemp -t vk-validate.XXXXXX.log)"
WGPU_VALIDATION=1 VK_LAYER_SETTINGS_PATH="$here/vulkan-validation" "$@" >"$log" 2>&1
status=$?
errors=$(grep -c "Validation Error:" "$log")
hazards=$(grep -c "SYNC-HAZARD" "$log")
practices=$(grep -c "UNASSIGNED-BestPractices" "$log")
# A message about a VkDevice: the layer saw the device the program ran on (not only the instance).
on_device=$(grep "UNASSIGNED-BestPractices" "$log" | grep -c "VK_OBJECT_TYPE_DEVICE")
echo "$*: exit $status; $errors validation errors, $hazards synchronization hazards, $practices best-practices warnings (log: $log)"
# Every message of the layer but the best-practices warnings counted above.
grep -E "Validation (Error|Warning|Performance Warning|Information):" "$log" | grep -v "UNASSIGNED-BestPractices" | cut -c1-400
if [ "$status" -ne 0 ]; then
  tail -20 "$log"
  echo "error: the command failed (exit $status)" >&2
  exit 1
fi
if [ "$errors" -gt 0 ] || [ "$hazards" -gt 0 ]; then
  echo "error: the validation layer reported $errors errors and $hazards synchronization hazards" >&2
  exit 1
fi
if [ "$practices" -eq 0 ]; then
  echo "error: the validation layer reported nothing, not even its best-practices warnings: it did not load" >&2
  exit 1
fi
if [ "$on_device" -eq 0 ]; then
  echo "error: the validation layer saw no Vulkan device (is the adapter a Vulkan one?)" >&2
  exit 1
fi
