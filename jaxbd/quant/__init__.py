"""Quantization: quantizers, quantizable Linen layers, calibration and integer deployment.

`QuantConfig` describes a scheme; models take it as their `quant` attribute, so
`model.clone(quant=QuantConfig())` is the fake-quantized model over the same variables.
`calibrate` fills the activation observers, `export` turns float variables into int8 codes with
scales, and `integer_model` runs them with integer arithmetic (see `jaxbd.quant.deploy`).
"""

from jaxbd.quant.quantizer import QuantConfig, default_config, from_config, head_quant, validate
from jaxbd.quant.deploy import (calibrate, export, integer_model, load_export, save_export)
