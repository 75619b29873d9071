# Sourced by the multi-node recipes (pretrain_7b.sh, finetune_7b.sh, finetune_lora_7b.sh):
# where this node sits in the job, the layout check, and `launch` to start one torchrun per
# node. Nothing here is model-specific.
#
# Node placement comes from the environment, or from SLURM's variables under srun:
#   NNODES        (SLURM_JOB_NUM_NODES)       nodes in the job
#   NODE_RANK     (SLURM_NODEID)              this node's index, 0 .. NNODES-1
#   MASTER_ADDR   (first host of SLURM_JOB_NODELIST)  rendezvous host, node 0
#   MASTER_PORT   (29500)                     rendezvous port
#   GPUS_PER_NODE (8)                         processes per node, one per GPU
#   MAX_RESTARTS  (3)                         torchrun restarts of a failed worker group; each
#                                             restart resumes from the latest checkpoint
#   RDZV_ID       (SLURM_JOB_ID, else "engine")  the rendezvous' name, the same on every node
# Under torchrun itself (`torchrun ... examples/pretrain_7b.sh`), the recipe takes NNODES and
# GPUS_PER_NODE from torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE instead.
#
# DRY_RUN=1 prints the memory / FLOPs plan of the whole job (`--dry-run`) and checks that the
# data and the tokenizer exist, instead of training; it needs neither GPUs nor the other nodes.
#
# The recipe's Python side (examples/recipe.py) runs the recipe with RECIPE_PRINT_ARGS=1: then
# `launch` prints the argument list, NUL-separated, instead of starting anything.

RECIPE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ "${RECIPE_PRINT_ARGS:-0}" == 1 && -n "${WORLD_SIZE:-}" && -n "${LOCAL_WORLD_SIZE:-}" ]]; then
    NNODES=$(( WORLD_SIZE / LOCAL_WORLD_SIZE ))  # torchrun's layout, whatever the env said
    GPUS_PER_NODE="$LOCAL_WORLD_SIZE"
    NODE_RANK="${GROUP_RANK:-0}"
fi
NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-${SLURM_NODE_RANK:-0}}}"
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-engine}}"
WORLD_SIZE_OF_JOB=$(( NNODES * GPUS_PER_NODE ))
PYTHON="${PYTHON:-python3}"

# say MESSAGE : to stdout, or to stderr (rank 0 only) while printing the argument list.
say() {
    if [[ "${RECIPE_PRINT_ARGS:-0}" != 1 ]]; then
        echo "$*"
    elif [[ "${RANK:-0}" == 0 ]]; then
        echo "$*" >&2
    fi
}

# last_flag FLAG DEFAULT ARGS... : the value of the last FLAG in ARGS (argparse: last wins).
last_flag() {
    local flag="$1" value="$2"
    shift 2
    while (( $# )); do
        if [[ "$1" == "$flag" && $# -ge 2 ]]; then
            value="$2"
        elif [[ "$1" == "$flag="* ]]; then
            value="${1#*=}"
        fi
        shift
    done
    echo "$value"
}

# layout_ok NODES TP PP MICRO GLOBAL : whether NODES x GPUS_PER_NODE splits into TP x PP x DP
# with GLOBAL a multiple of MICRO x DP.
layout_ok() {
    local world=$(( $1 * GPUS_PER_NODE )) model=$(( $2 * $3 ))
    (( world % model == 0 )) && (( $5 % ($4 * (world / model)) == 0 ))
}

# check_layout NAME ARGS... : the job's layout from the recipe's flags (and any given after it),
# checked before torchrun starts on any node; the error names what to change.
check_layout() {
    local name="$1"
    shift
    local tp pp micro global world dp
    tp="$(last_flag --tensor-model-parallel-size 1 "$@")"
    pp="$(last_flag --pipeline-model-parallel-size 1 "$@")"
    micro="$(last_flag --micro-batch-size 1 "$@")"
    global="$(last_flag --global-batch-size "$micro" "$@")"
    world="$WORLD_SIZE_OF_JOB"
    if (( world % (tp * pp) )); then
        echo "$name: NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE = $world processes do not" \
             "split into TP=$tp x PP=$pp; set TP / PP (or NNODES) so that TP x PP divides" \
             "$world" >&2
        return 1
    fi
    dp=$(( world / (tp * pp) ))
    if (( global % (micro * dp) )); then
        local lower=$(( global / (micro * dp) * micro * dp )) upper nodes=() n
        upper=$(( lower + micro * dp ))
        for (( n = 1; n <= 2 * NNODES + 2; n++ )); do
            local n_pp="$pp"
            [[ -z "${PP_GIVEN:-}" ]] && n_pp=$(( n % 2 == 0 ? 2 : 1 ))
            if (( n != NNODES )) && layout_ok "$n" "$tp" "$n_pp" "$micro" "$global"; then
                nodes+=("$n")
            fi
        done
        echo "$name: GLOBAL_BATCH_SIZE ($global) is not a multiple of MICRO_BATCH_SIZE x DP" \
             "= $micro x $dp (NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE / (TP=$tp x" \
             "PP=$pp)); set GLOBAL_BATCH_SIZE=$lower or $upper, or run on NNODES in" \
             "{${nodes[*]}}" >&2
        return 1
    fi
}

# launch SCRIPT ARGS... : SCRIPT (examples/pretrain.py) on every GPU of this node under
# torchrun; the plan and the input checks with DRY_RUN=1; the argument list with
# RECIPE_PRINT_ARGS=1.
launch() {
    local script="$1"
    shift
    if [[ "${RECIPE_PRINT_ARGS:-0}" == 1 ]]; then
        if [[ "${DRY_RUN:-0}" == 1 ]]; then
            set -- "$@" --dry-run
        fi
        printf '%s\0' "$@"
        return
    fi
    check_layout "$(basename "$0")" "$@" || exit 1
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "node $NODE_RANK of $NNODES: plan for $WORLD_SIZE_OF_JOB processes (DRY_RUN=1)"
        WORLD_SIZE="$WORLD_SIZE_OF_JOB" "$PYTHON" "$script" "$@" --dry-run
        return
    fi
    echo "node $NODE_RANK of $NNODES: $GPUS_PER_NODE processes, rendezvous" \
         "$MASTER_ADDR:$MASTER_PORT (c10d, id $RDZV_ID), up to $MAX_RESTARTS restarts"
    # A restarted worker group must not read the previous attempt's addresses from a store
    # shared across attempts: a fresh store each rendezvous round (see docs/training.md).
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}" \
    "$PYTHON" -m torch.distributed.run \
        --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
        --max-restarts "$MAX_RESTARTS" \
        "$script" "$@"
}
