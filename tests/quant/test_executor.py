"""Executors: the per-linear work on threads or on Ray gives the same model."""

import pytest
import torch

from cmpq.config import CMPQConfig
from cmpq.errors import CmpqError
from cmpq.quant.executor import ThreadExecutor, make_executor
from cmpq.quant.pipeline import quantize

from tiny import make_tiny_model, tiny_batch


def quantized_state(executor, arch="llama", **options):
    model = make_tiny_model(arch)
    config = CMPQConfig(bits=3.3, kmeans_iters=5, tune_model=0, **options)
    quantize(model, config, calibration=tiny_batch(4, 24), progress=False, executor=executor)
    return model.state_dict()


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def test_threads_give_a_serial_run_whatever_their_number():
    assert_same_state(quantized_state(ThreadExecutor(1)), quantized_state(ThreadExecutor(2)))


@pytest.fixture(scope="module")
def ray_executor():
    ray = pytest.importorskip("ray")
    from cmpq.quant.executor import RayExecutor

    executor = RayExecutor(num_cpus=2)
    yield executor
    ray.shutdown()


@pytest.mark.parametrize("options", [{}, {"allocation": "paper", "error_feedback": False}])
def test_ray_tasks_give_the_threads_model_byte_for_byte(ray_executor, options):
    assert_same_state(
        quantized_state(ray_executor, "qwen2", **options),
        quantized_state(ThreadExecutor(), "qwen2", **options),
    )


def test_unknown_executor_and_misplaced_address_are_clear_errors():
    with pytest.raises(CmpqError, match="`executor` must be one of threads, ray"):
        make_executor("dask")
    with pytest.raises(CmpqError, match="applies to `executor` ray only"):
        make_executor("threads", "ray://head:10001")
