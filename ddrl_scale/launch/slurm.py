"""`ddrl launch slurm`: render the sbatch script of a run from its config and submit it.

The job script (template: launchers/slurm/job.sbatch.tmpl) runs one torchrun per node with the
head node from `scontrol show hostnames`, asks SLURM for a USR1 warning before the time limit and
requeues itself after the trainer has checkpointed (train/preemption.py). The run's expanded config
is frozen at submission in RUN_DIR/launch/config.yaml, so the job runs what was asked.
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path

from ddrl_scale.config import ConfigError, RunConfig, save_config


def template() -> str:
    return (resources.files("ddrl_scale.launchers") / "slurm" / "job.sbatch.tmpl").read_text()


def sweep_overrides(sweeps: list[str]) -> list[list[str]]:
    """['optim.lr=1e-5,3e-5', 'algo.data_beta=0,0.01'] -> every combination as override lists."""
    axes = []
    for sweep in sweeps:
        key, _, values = sweep.partition("=")
        if not key or not values:
            raise ConfigError(f"--sweep '{sweep}': expected key=value1,value2,...")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(combination) for combination in itertools.product(*axes)] if axes else []


def sbatch_header(config: RunConfig, array_size: int, dependency: str) -> list[str]:
    launch, log_dir = config.launch, config.launch.log_dir
    lines = [f"--job-name={launch.job_name}", f"--nodes={launch.nodes}", "--ntasks-per-node=1",
             f"--time={launch.time}", f"--output={log_dir}/%x-%j.out", "--open-mode=append"]
    if launch.gpus_per_node:
        lines.append(f"--gres=gpu:{launch.gpus_per_node}")
    if launch.cpus_per_node:
        lines.append(f"--cpus-per-task={launch.cpus_per_node}")
    for key in ("mem", "partition", "account", "qos"):
        if getattr(launch, key):
            lines.append(f"--{key}={getattr(launch, key)}")
    if launch.signal_seconds:
        lines.append(f"--signal=B:USR1@{launch.signal_seconds}")
    lines.append("--requeue" if launch.requeue else "--no-requeue")
    if array_size:
        lines.append(f"--array=0-{array_size - 1}")
    if dependency:
        lines.append(f"--dependency={dependency}")
    return [f"#SBATCH {line}" for line in lines]


# the reward node: `ddrl reward-serve` on the job's last node, waited for before training starts
REWARD_BLOCK = """REWARD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tail -n 1)
export DDRL_REWARD_URL="http://$REWARD_NODE:{port}"
srun --nodes=1 --ntasks=1 --nodelist="$REWARD_NODE" --output={log}/%x-%j-reward.out {container} \\
  {python} -m ddrl_scale.cli reward-serve {args} --host 0.0.0.0 --port {port} &
REWARD_PID=$!
for _ in $(seq 1 600); do
  {python} -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \\
    "$DDRL_REWARD_URL/health" 2>/dev/null && break
  kill -0 "$REWARD_PID" 2>/dev/null || {{ echo "$(date +%T) reward service on $REWARD_NODE exited"; exit 1; }}
  sleep 1
done
echo "$(date +%T) reward service up at $DDRL_REWARD_URL"
"""


def place_roles(config: RunConfig) -> RunConfig:
    """launch.rollout_nodes -> the rollout settings the roles need (in the frozen config)."""
    launch = config.launch
    if launch.rollout_nodes:
        wanted = launch.rollout_nodes * launch.nproc_per_node
        if config.rollout.mode == "disaggregated" and config.rollout.num_ranks not in (1, wanted):
            raise ConfigError(f"config key 'rollout.num_ranks': {config.rollout.num_ranks}, but "
                              f"launch.rollout_nodes={launch.rollout_nodes} x nproc_per_node="
                              f"{launch.nproc_per_node} places {wanted} rollout ranks")
        if launch.nproc_per_node % config.rollout.tp_size:
            # a node's ranks are consecutive job ranks: a copy that divides them never straddles
            # two nodes, whose link is far slower than the node's own for its all-reduces
            raise ConfigError(f"config key 'rollout.tp_size': {config.rollout.tp_size} must divide "
                              f"launch.nproc_per_node={launch.nproc_per_node}, so that each "
                              f"tensor-parallel rollout copy stays within one node")
        config.rollout.mode, config.rollout.num_ranks = "disaggregated", wanted
        config = type(config)(**{f: getattr(config, f) for f in config.__dataclass_fields__})
    return config


def render(config: RunConfig, config_file: str | Path, sweeps: list[str] | None = None,
           dependency: str = "", python: str = sys.executable) -> str:
    """The sbatch script of a run whose expanded config is (or will be) at config_file."""
    launch = config.launch
    combinations = sweep_overrides(sweeps or [])
    array = ""
    if combinations:
        quoted = " ".join(shlex.quote(" ".join(c)) for c in combinations)
        array = (f"SWEEP=({quoted})\n"
                 'ARRAY_OVERRIDES="${SWEEP[$SLURM_ARRAY_TASK_ID]} '
                 'run.output_dir=$RUN_DIR/sweep_$SLURM_ARRAY_TASK_ID"\n'
                 'RUN_DIR="$RUN_DIR/sweep_$SLURM_ARRAY_TASK_ID"')
    container = ""
    if launch.container_image:
        container = f"--container-image={shlex.quote(launch.container_image)}"
        if launch.container_mounts:
            container += f" --container-mounts={shlex.quote(launch.container_mounts)}"
        python = "python"
    env = "\n".join(f"export {key}={shlex.quote(str(value))}" for key, value in launch.env.items())
    threads = max(1, launch.cpus_per_node // launch.nproc_per_node) if launch.cpus_per_node else 1
    train_nodes = launch.nodes - launch.reward_nodes
    role = ""
    if launch.rollout_nodes:  # the last rollout_nodes training nodes sample; roles go by node
        role = (f'if [ "$SLURM_NODEID" -ge {train_nodes - launch.rollout_nodes} ]; then export '
                f'DDRL_ROLE=rollout; else export DDRL_ROLE=trainer; fi; ')
    reward = reward_stop = exclude = ""
    if launch.reward_nodes:
        log = shlex.quote(str(Path(launch.log_dir).resolve()))
        reward = REWARD_BLOCK.format(port=launch.reward_port, log=log, container=container,
                                     python=shlex.quote(python), args=launch.reward_args)
        reward_stop = 'kill "$REWARD_PID" 2>/dev/null; wait "$REWARD_PID" 2>/dev/null\n'
        exclude = '--exclude="$REWARD_NODE" '
    values = {
        "SBATCH": "\n".join(sbatch_header(config, len(combinations), dependency)),
        "RUN_DIR": shlex.quote(str(Path(config.run.output_dir).resolve())),
        "LOG_DIR": shlex.quote(str(Path(launch.log_dir).resolve())), "PORT": str(launch.port),
        "THREADS": str(threads), "ENV": env, "ARRAY": array, "CONTAINER": container,
        "PYTHON": shlex.quote(python), "NPROC": str(launch.nproc_per_node),
        "CONFIG": shlex.quote(str(Path(config_file).resolve())), "OVERRIDES": "",
        "REQUEUE": "true" if launch.requeue else "false", "TRAIN_NODES": str(train_nodes),
        "ROLE": role, "REWARD": reward, "REWARD_STOP": reward_stop, "EXCLUDE": exclude,
    }
    script = template()
    for key, value in values.items():
        script = script.replace(f"@@{key}@@", value)
    return script.replace(f"--output={launch.log_dir}/", f"--output={values['LOG_DIR']}/")


def submit(script: str) -> str:
    """sbatch the script (from stdin); return the job id, or raise with SLURM's own message."""
    try:
        done = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("sbatch is not installed or not on PATH: is this a SLURM login node?") \
            from None
    if done.returncode:
        raise RuntimeError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def launch(config: RunConfig, sweeps: list[str], chain: int, dry_run: bool) -> list[str]:
    """Render (and unless dry_run, submit) the job; chain > 1 submits dependent jobs in a row."""
    config = place_roles(config)
    launch_ = config.launch
    ranks = (launch_.nodes - launch_.reward_nodes - launch_.rollout_nodes) * launch_.nproc_per_node
    if ranks > 1 and config.parallel.engine == "none":
        raise ConfigError(f"{ranks} trainer ranks (launch.nodes - reward_nodes - rollout_nodes, times "
                          f"nproc_per_node) need a sharded engine: set parallel.engine=fsdp2, "
                          f"deepspeed or megatron")
    run_dir = Path(config.run.output_dir)
    config_file = run_dir / "launch" / "config.yaml"
    if dry_run:
        print(render(config, config_file, sweeps))
        return []
    save_config(config, config_file.parent)
    Path(config.launch.log_dir).mkdir(parents=True, exist_ok=True)
    jobs: list[str] = []
    for _ in range(max(1, chain)):
        # a chain link runs after the previous one ends, however it ended (time limit included)
        dependency = f"afterany:{jobs[-1]}" if jobs else ""
        jobs.append(submit(render(config, config_file, sweeps, dependency)))
    log_dir = Path(config.launch.log_dir).resolve()
    for job in jobs:
        print(f"submitted job {job}: logs {log_dir}/{config.launch.job_name}-{job}.out "
              f"(per node: {config.launch.job_name}-{job}-node*.out)")
    return jobs
