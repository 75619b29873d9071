# Sourced by the multi-node launchers (pretrain_7b.sh, finetune_7b.sh): where this node sits in
# the job, and `launch` to start one torchrun per node. Nothing here is model-specific.
#
# Node placement comes from the environment, or from SLURM's variables under srun:
#   NNODES        (SLURM_JOB_NUM_NODES)       nodes in the job
#   NODE_RANK     (SLURM_NODEID)              this node's index, 0 .. NNODES-1
#   MASTER_ADDR   (first host of SLURM_JOB_NODELIST)  rendezvous host, node 0
#   MASTER_PORT   (29500)                     rendezvous port
#   GPUS_PER_NODE (8)                         processes per node, one per GPU
# DRY_RUN=1 prints the memory / FLOPs plan of the whole job (`--dry-run`) instead of training;
# it needs neither GPUs nor the other nodes.

NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-${SLURM_NODE_RANK:-0}}}"
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
WORLD_SIZE_OF_JOB=$(( NNODES * GPUS_PER_NODE ))
PYTHON="${PYTHON:-python3}"

# launch ARGS... : examples/pretrain.py on every GPU of this node, or the plan with DRY_RUN=1.
launch() {
    echo "node $NODE_RANK of $NNODES: $GPUS_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        WORLD_SIZE="$WORLD_SIZE_OF_JOB" "$PYTHON" examples/pretrain.py "$@" --dry-run
        return
    fi
    "$PYTHON" -m torch.distributed.run \
        --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        examples/pretrain.py "$@"
}

# resume_args DIR : "--load DIR" once DIR holds a checkpoint (a first run starts from scratch;
# a missing checkpoint is otherwise an error, so that a typo in --load never trains from zero).
resume_args() {
    if [[ -f "$1/latest_checkpointed_iteration.txt" ]]; then
        echo "--load $1"
    fi
}
