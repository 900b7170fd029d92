"""install_as_esper and esper_fast.run: esper-lite programs import esper_fast's training layer.

Each case runs in a fresh interpreter (the aliasing installs an import hook for the process).
A throw-away ``esper`` package written into tmp_path stands in for an installed esper-lite:
its top package imports the training layer the way esper-lite's does, and its ``simic``
package is a program on top.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, *args: str, path: list[str] = (), cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*path, ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def fake_esper_lite(tmp_path):
    """An installed 'esper-lite' whose top package and simic import the training layer."""
    pkg = tmp_path / "esper"
    (pkg / "simic").mkdir(parents=True)
    (pkg / "leyline").mkdir()
    (pkg / "__init__.py").write_text(
        "from esper.leyline import SeedStage\nfrom esper.kasmina import MorphogeneticModel, SeedSlot\nORIGIN = 'lite'\n"
    )
    # esper-lite's own leyline: must never be the one imported once esper_fast is installed.
    (pkg / "leyline" / "__init__.py").write_text("raise ImportError('the original leyline was imported')\n")
    (pkg / "simic" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from esper.leyline import SeedStage, TelemetryEventType
            from esper.leyline.actions import build_action_enum
            from esper.kasmina.slot import SeedSlot
            from esper.runtime import get_task_spec
            from esper.tolaria import TolariaGovernor
            from esper.utils.data import load_cifar10
            ORIGIN = 'lite-simic'
            """
        )
    )
    return tmp_path


def test_training_layer_names_are_esper_fast_modules_without_esper_lite():
    out = _ok(_run(textwrap.dedent(
        """
        import esper_fast, esper_fast.kasmina.slot, esper_fast.leyline.actions, esper_fast.kasmina.blueprints.cnn
        names = esper_fast.install_as_esper()
        import esper, esper.kasmina, esper.kasmina.slot, esper.leyline.actions, esper.kasmina.blueprints.cnn
        import esper.tolaria.governor, esper.runtime.tasks, esper.utils.data
        assert names == ['esper.leyline', 'esper.kasmina', 'esper.tolaria', 'esper.runtime', 'esper.utils']
        assert esper.kasmina is esper_fast.kasmina
        assert esper.kasmina.slot is esper_fast.kasmina.slot
        assert esper.leyline.actions is esper_fast.leyline.actions
        assert esper.kasmina.blueprints.cnn is esper_fast.kasmina.blueprints.cnn
        from esper.leyline import SeedStage
        from esper.kasmina import SeedSlot
        assert SeedStage is esper_fast.leyline.SeedStage and SeedSlot is esper_fast.kasmina.SeedSlot
        assert esper_fast.install_as_esper() == names  # idempotent
        try:
            import esper.simic
        except ModuleNotFoundError as exc:
            print('no simic:', exc.name)
        """
    )))
    assert "no simic: esper.simic" in out


def test_programs_on_top_load_from_esper_lite_and_share_the_types(fake_esper_lite):
    out = _ok(_run(textwrap.dedent(
        """
        import esper_fast
        esper_fast.install_as_esper()
        import esper, esper.simic
        assert esper.ORIGIN == 'lite' and esper.simic.ORIGIN == 'lite-simic'
        assert esper.SeedStage is esper_fast.leyline.SeedStage
        assert esper.simic.SeedSlot is esper_fast.kasmina.SeedSlot
        assert esper.simic.TolariaGovernor is esper_fast.tolaria.TolariaGovernor
        print(esper.__file__)
        """
    ), path=[str(fake_esper_lite)]))
    assert str(fake_esper_lite) in out


def test_installing_after_the_original_training_layer_was_imported_is_refused(tmp_path):
    pkg = tmp_path / "esper" / "kasmina"
    pkg.mkdir(parents=True)
    (tmp_path / "esper" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    result = _run(textwrap.dedent(
        """
        import esper.kasmina
        import esper_fast
        esper_fast.install_as_esper()
        """
    ), path=[str(tmp_path)])
    assert result.returncode != 0
    assert "must run before esper-lite's training layer is imported; already imported: esper.kasmina" in result.stderr


def test_pickles_written_under_esper_names_load_into_esper_fast_classes():
    out = _ok(_run(textwrap.dedent(
        """
        import pickle
        import esper_fast
        from esper_fast.kasmina.slot import SeedState
        from esper_fast.leyline import SeedStage
        esper_fast.install_as_esper()
        state = SeedState(seed_id='s', blueprint_id='norm', stage=SeedStage.TRAINING)
        state.metrics.record_accuracy(42.0)
        # Protocol 2 names classes in text lines: rename them as esper-lite's pickles name them.
        data = pickle.dumps(state, protocol=2).replace(b'esper_fast.', b'esper.')
        assert b'esper_fast' not in data
        loaded = pickle.loads(data)
        assert type(loaded) is SeedState and loaded.stage is SeedStage.TRAINING
        assert loaded.metrics.current_val_accuracy == 42.0
        print('ok')
        """
    )))
    assert out.strip() == "ok"


def test_run_executes_a_script_with_its_arguments(tmp_path):
    script = tmp_path / "experiment.py"
    script.write_text(textwrap.dedent(
        """
        import sys
        import esper.kasmina, esper_fast.kasmina
        assert esper.kasmina is esper_fast.kasmina
        print(__name__, sys.argv[1:])
        """
    ))
    out = _ok(_run("", "-m", "esper_fast.run", str(script), "--flag", "1"))
    assert out.strip() == "__main__ ['--flag', '1']"


def test_run_executes_a_module(fake_esper_lite):
    (fake_esper_lite / "esper" / "simic" / "__main__.py").write_text(
        "import sys\nfrom esper.simic import SeedSlot\nprint(SeedSlot.__module__, sys.argv[1:])\n"
    )
    out = _ok(_run("", "-m", "esper_fast.run", "-m", "esper.simic", "heuristic", "--epochs", "3",
                   path=[str(fake_esper_lite)]))
    assert out.strip() == "esper_fast.kasmina.slot ['heuristic', '--epochs', '3']"


def test_run_without_a_program_prints_usage_and_fails():
    result = _run("", "-m", "esper_fast.run")
    assert result.returncode == 2
    assert "usage: python -m esper_fast.run" in result.stderr


def test_a_program_written_for_esper_runs_on_the_fused_kernels():
    out = _ok(_run(textwrap.dedent(
        """
        import collections
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        import esper_fast
        esper_fast.install_as_esper()
        from esper.leyline import SeedStage
        from esper.tolaria import (TolariaGovernor, create_model, train_epoch_blended,
                                   validate_and_get_metrics, validate_with_attribution)

        counts = collections.Counter()

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == 'esper_fast':
                    counts[func.name().split('::')[1].split('.')[0]] += 1
                return func(*args, **(kwargs or {}))

        torch.manual_seed(0)
        model = create_model('cifar10', 'cpu')
        model.germinate_seed('conv_light', 'seed_0')
        model.seed_slot.advance_stage(SeedStage.TRAINING)
        model.seed_slot.state.transition(SeedStage.BLENDING)
        model.seed_slot.set_alpha(0.5)
        data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
        criterion = torch.nn.CrossEntropyLoss()
        host = torch.optim.SGD(model.get_host_parameters(), lr=0.01)
        seed = torch.optim.SGD(model.get_seed_parameters(), lr=0.01)
        governor = TolariaGovernor(model)
        with Count():
            train_epoch_blended(model, data, criterion, host, seed, 'cpu')
            validate_and_get_metrics(model, data, data, criterion, 'cpu', compute_per_class=True)
            validate_with_attribution(model, data, criterion, 'cpu')
            governor.snapshot()
        print(sorted(counts))
        """
    )))
    assert out.strip() == "['blend_backward', 'blend_forward', 'metrics_update', 'snapshot_pack']"
