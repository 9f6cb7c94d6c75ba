"""Run a bioimage.io package through bioimageio.core's own prediction, on its test input, and
print the largest difference from its test output per weight format (one line each, as JSON).

Run by ``tests/test_models.py`` with the Python of the environment ``make test`` builds for
bioimageio.core (``.venv/bioimageio-core``): bioimageio.core pins a bioimageio.spec whose
serialisers need an older pydantic than overtile's, so it lives in an environment of its own,
as it would on a user's machine, and finds torch and onnxruntime in overtile's.

    python tests/bioimageio_core_check.py PACKAGE.zip torchscript onnx
"""

import json
import sys
import zipfile

import numpy as np
from bioimageio.core import create_prediction_pipeline, load_model_description, predict


def main(package: str, formats: list[str]) -> None:
    descr = load_model_description(package)
    with zipfile.ZipFile(package) as z:
        x, y = (np.load(z.open(name)) for name in ("test_input.npy", "test_output.npy"))
    inputs, outputs = descr.inputs[0].id, descr.outputs[0].id
    for weights in formats:
        pipeline = create_prediction_pipeline(descr, weight_format=weights)
        got = predict(model=pipeline, inputs={inputs: x}).members[outputs].data.values
        print(json.dumps({"weights": weights, "shape": list(got.shape), "expected": list(y.shape),
                          "max_abs_diff": float(np.abs(got - y).max()) if got.shape == y.shape else None}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
