# Shared launcher, sourced by every wrapper under examples/mcore/<model>/ (it is not run on its own).
#
# A wrapper sets its paths, parallel sizes and batch sizes, sources this file, then calls
#   require_paths VAR ...                         stop early while a "your ... path" placeholder is left
#   launch_distributed LOG_NAME SCRIPT.py ARGS... torchrun over NPUS_PER_NODE x NNODES processes
#   launch_single LOG_NAME SCRIPT.py ARGS...      one process (conversion, preprocessing)
# Both tee stdout and stderr to logs/LOG_NAME.log (under the current directory) and fail when the script fails.
# Wrappers end their command with "$@": flags given to a wrapper are added to the script's flags.
#
# Environment (defaults: one node of 8 devices): NPUS_PER_NODE (or GPUS_PER_NODE), NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT; ASCEND_HOME (default /usr/local/Ascend). Multi-node: docs/multinode.md.

MS_LORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# NPU: the CANN toolkit (and ATB, for some torch_npu kernels) must be on the library paths before torch_npu
# loads. Guarded so that the same wrapper runs unchanged on a GPU machine, where none of this exists.
ASCEND_HOME=${ASCEND_HOME:-/usr/local/Ascend}
if [ -f "$ASCEND_HOME/ascend-toolkit/set_env.sh" ]; then
    # shellcheck disable=SC1091
    source "$ASCEND_HOME/ascend-toolkit/set_env.sh"
fi
if [ -f "$ASCEND_HOME/nnal/atb/set_env.sh" ]; then
    # shellcheck disable=SC1091
    source "$ASCEND_HOME/nnal/atb/set_env.sh"
fi

set -eo pipefail  # after set_env.sh, which is not written for errexit; pipefail: `| tee` keeps the exit code

# megatron-core orders its tensor-parallel collectives by issuing them on one hardware queue
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONPATH="$MS_LORA_ROOT${PYTHONPATH:+:$PYTHONPATH}"

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-8}}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))
if [ "$NNODES" -gt 1 ] && { [ "$MASTER_ADDR" = localhost ] || [ "$MASTER_ADDR" = 127.0.0.1 ]; }; then
    echo "error: NNODES=$NNODES needs MASTER_ADDR set to node 0's address on every node (docs/multinode.md)" >&2
    exit 1
fi

ms_on_npu() {
    command -v npu-smi >/dev/null 2>&1 || [ -e /dev/davinci0 ]
}

if ms_on_npu; then
    # the first NPUS_PER_NODE devices unless the caller chose others
    ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-$(seq -s, 0 $((NPUS_PER_NODE - 1)))}
    export ASCEND_RT_VISIBLE_DEVICES
    # large jobs take minutes to build their first HCCL communicators
    export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800}
fi

DISTRIBUTED_ARGS="--nproc-per-node $NPUS_PER_NODE --nnodes $NNODES --node-rank $NODE_RANK \
--master-addr $MASTER_ADDR --master-port $MASTER_PORT"

require_paths() {
    local name value missing=0
    for name in "$@"; do
        value=${!name}
        if [ -z "$value" ] || [[ "$value" == your\ * ]]; then
            echo "error: set $name at the top of $0 (or in the environment); it is '${value}'" >&2
            missing=1
        fi
    done
    return $missing
}

launch_distributed() {
    local log=$1 script=$2
    shift 2
    mkdir -p logs
    echo "[launch] torchrun $DISTRIBUTED_ARGS $script (log: logs/$log.log)"
    # shellcheck disable=SC2086
    ${TORCHRUN:-torchrun} $DISTRIBUTED_ARGS "$MS_LORA_ROOT/$script" "$@" 2>&1 | tee "logs/$log.log"
}

launch_single() {
    local log=$1 script=$2
    shift 2
    mkdir -p logs
    echo "[launch] python $script (log: logs/$log.log)"
    "${PYTHON:-python}" "$MS_LORA_ROOT/$script" "$@" 2>&1 | tee "logs/$log.log"
}
