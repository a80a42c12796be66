import math

from cmpq.alloc.budget import model_cost
from cmpq.config import SQUEEZELLM_METHOD, SQUEEZELLM_OUTLIERS, CMPQConfig
from cmpq.format.cost import LayerShape
from cmpq.models.graph import quantizable_linears, weight_matrix
from cmpq.quant.pipeline import quantize
from cmpq.runtime.qlinear import quantized_layers

from tiny import make_tiny_model, tiny_batch


def test_the_squeezellm_recipe_gives_one_integer_width_per_layer_and_its_outliers():
    model = make_tiny_model("qwen2")
    shapes = [LayerShape(*weight_matrix(m).shape) for m in quantizable_linears(model).values()]
    params = sum(s.numel for s in shapes)
    bits = math.ceil(model_cost(shapes, 3, "row", SQUEEZELLM_OUTLIERS, False) / params * 1e4) / 1e4
    config = CMPQConfig(bits=bits, kmeans_iters=5, **SQUEEZELLM_METHOD)
    report = quantize(model, config, calibration=tiny_batch(3, 16), progress=False)
    layers = quantized_layers(model)
    assert len(layers) == 14
    for module in layers.values():
        assert module.group_bits.tolist() == [3]  # one integer width in every layer
        assert module.layout == "row"
        weights = module.out_features * module.in_features
        outliers = module.outlier_values.numel()
        assert abs(outliers / weights - SQUEEZELLM_OUTLIERS) < 0.002
    assert report.effective_bits <= bits
