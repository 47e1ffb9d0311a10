"""`ddrl launch`: the rendered sbatch script (no SLURM needed) and the local torchrun command."""

import subprocess
import sys

import pytest

from ddrl_scale.config import ConfigError, load_config
from ddrl_scale.launch.slurm import launch, render, sweep_overrides


def _script(*overrides, sweeps=None, dependency=""):
    config = load_config("configs/demo_cpu.yaml", ["parallel.engine=fsdp2", *overrides])
    return render(config, "/runs/x/launch/config.yaml", sweeps, dependency)


def test_dry_run_prints_a_complete_script_that_bash_accepts(tmp_path):
    """`ddrl launch slurm configs/demo_cpu.yaml --nodes 2 --dry-run` passes `bash -n`."""
    done = subprocess.run([sys.executable, "-m", "ddrl_scale.cli", "launch", "slurm",
                           "configs/demo_cpu.yaml", "--nodes", "2", "parallel.engine=fsdp2",
                           f"run.output_dir={tmp_path / 'run'}", "--dry-run"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert "#SBATCH --nodes=2" in script and "#SBATCH --signal=B:USR1@120" in script
    assert "#SBATCH --requeue" in script and "scontrol requeue" in script
    assert "scontrol show hostnames" in script and "--rdzv-backend c10d" in script
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_script_carries_the_launch_settings():
    """GPUs, CPUs, memory, partition/account/qos, containers and environment reach the script."""
    script = _script("launch.gpus_per_node=8", "launch.cpus_per_node=64", "launch.mem=500G",
                     "launch.partition=batch", "launch.account=proj", "launch.qos=high",
                     "launch.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                     "launch.container_mounts=/data:/data", "launch.nproc_per_node=8",
                     "launch.env={NCCL_DEBUG: WARN}", "launch.requeue=false")
    for line in ("#SBATCH --gres=gpu:8", "#SBATCH --cpus-per-task=64", "#SBATCH --mem=500G",
                 "#SBATCH --partition=batch", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --no-requeue", "--container-image=nvcr.io/nvidia/pytorch:25.01-py3",
                 "--container-mounts=/data:/data", "export NCCL_DEBUG=WARN",
                 "--nproc-per-node 8", "OMP_NUM_THREADS:-8"):
        assert line in script, line
    assert "&& false; then" in script  # requeue off: the preemption branch never requeues


def test_sweep_renders_a_job_array_and_chain_a_dependency():
    """--sweep makes an array over the value grid (own run folder per task); --chain depends."""
    assert sweep_overrides(["optim.lr=1e-5,3e-5", "algo.data_beta=0,0.01"]) == [
        ["optim.lr=1e-5", "algo.data_beta=0"], ["optim.lr=1e-5", "algo.data_beta=0.01"],
        ["optim.lr=3e-5", "algo.data_beta=0"], ["optim.lr=3e-5", "algo.data_beta=0.01"]]
    script = _script(sweeps=["optim.lr=1e-5,3e-5"], dependency="afterany:41")
    assert "#SBATCH --array=0-1" in script and "#SBATCH --dependency=afterany:41" in script
    assert "SWEEP=(optim.lr=1e-5 optim.lr=3e-5)" in script
    assert 'RUN_DIR="$RUN_DIR/sweep_$SLURM_ARRAY_TASK_ID"' in script
    with pytest.raises(ConfigError, match="--sweep"):
        sweep_overrides(["optim.lr"])


def test_multi_rank_launch_needs_a_sharded_engine(tmp_path):
    """2 nodes with parallel.engine=none is refused before anything is written or submitted."""
    config = load_config("configs/demo_cpu.yaml", ["launch.nodes=2", f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="parallel.engine=fsdp2"):
        launch(config, [], 1, dry_run=False)


def test_launch_local_execs_torchrun(tmp_path):
    """`ddrl launch local CONFIG --nproc 2` validates the config, then runs torchrun (printed)."""
    done = subprocess.run([sys.executable, "-m", "ddrl_scale.cli", "launch", "local",
                           "configs/demo_cpu.yaml", "--nproc", "2", "optim.lr=abc"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "optim.lr" in done.stderr


def test_roles_are_placed_by_node():
    """launch.rollout_nodes: the last training nodes export DDRL_ROLE=rollout; the frozen config
    gets the matching rollout settings; a reward node is excluded from torchrun and waited for."""
    from ddrl_scale.launch.slurm import place_roles

    config = load_config("configs/demo_cpu.yaml", [
        "parallel.engine=fsdp2", "launch.nodes=4", "launch.nproc_per_node=2", "launch.rollout_nodes=1",
        "launch.reward_nodes=1", "launch.reward_args=--reward pkg.mod:Aesthetic --max-batch 8"])
    placed = place_roles(config)
    assert (placed.rollout.mode, placed.rollout.num_ranks) == ("disaggregated", 2)
    # a tensor-parallel rollout copy over a node's 2 ranks
    config.rollout.tp_size = 2
    assert place_roles(config).rollout.tp_size == 2
    script = render(placed, "/runs/x/launch/config.yaml")
    assert "export TRAIN_NODES=3" in script and '--nnodes "$TRAIN_NODES"' in script
    assert ('if [ "$SLURM_NODEID" -ge 2 ]; then export DDRL_ROLE=rollout; else export '
            'DDRL_ROLE=trainer; fi;') in script
    assert '--exclude="$REWARD_NODE"' in script
    assert 'export DDRL_REWARD_URL="http://$REWARD_NODE:8400"' in script
    assert "reward-serve --reward pkg.mod:Aesthetic --max-batch 8 --host 0.0.0.0 --port 8400" in script
    assert '"$DDRL_REWARD_URL/health"' in script and 'kill "$REWARD_PID"' in script
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    plain = _script()
    assert "DDRL_ROLE" not in plain and "REWARD_NODE" not in plain and "export TRAIN_NODES=1" in plain


@pytest.mark.parametrize(("overrides", "key"), [
    (["launch.nodes=2", "launch.rollout_nodes=2"], "launch.rollout_nodes"),
    (["launch.nodes=2", "launch.reward_nodes=1"], "launch.reward_args"),
    (["launch.nodes=2", "launch.reward_nodes=1", "launch.reward_args=--reward x:Y",
      "launch.rollout_nodes=1"], "launch.rollout_nodes"),
    (["launch.nodes=3", "launch.nproc_per_node=2", "launch.rollout_nodes=1",
      "rollout.mode=disaggregated", "rollout.num_ranks=3", "algo.prompts_per_step=6"], "rollout.num_ranks"),
    (["launch.nodes=2", "launch.nproc_per_node=3", "launch.rollout_nodes=1", "rollout.tp_size=2"],
     "rollout.tp_size"),
])
def test_impossible_role_placement_names_the_key(overrides, key):
    from ddrl_scale.launch.slurm import place_roles

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        place_roles(load_config("configs/demo_cpu.yaml", ["parallel.engine=fsdp2", *overrides]))
