# Copyright 2026 The blip2_ros Authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""
One-row products with blip2-opt-2.7b's weight shapes: cuBLAS against reductions.

A batch-1 decode step multiplies one row by every weight matrix of the language model, so its
speed is how fast the GPU reads those weights. For each Linear shape of OPT-2.7b (the attention
projections, 2560 x 2560; the MLP, 2560 -> 10240 and 10240 -> 2560, all with a bias; the output
embedding, 2560 -> 50272, without), as many distinct bfloat16 matrices as the model has (so the
L2 cache cannot hold them) are each multiplied by one row (``--rows N``: N rows, a batch-N
step) in one compiled graph, compiled as the captioner compiles on GPUs (CUDA graph,
coordinate descent tuning):

* ``cuBLAS``: plain nn.Linear layers: the matmul kernels torch picks (the baseline);
* ``bias apart`` (layers with a bias): the product without the bias, then the bias added.
  With coordinate descent tuning on, torch itself rewrites a one-row product without a bias
  as a reduction (its output embedding row shows that), so this measures torch's own
  reduction where OneRowLinear writes one;
* ``OneRowLinear`` (one row): the captioner's layers, a reduction inductor writes and tunes;
* ``rows reduction`` (more rows): the same reduction for N rows, laid out so that the N
  products with one weight row are next to each other and that row is read from memory once.
  A candidate for batch sizes above 1, where the captioner leaves the products to cuBLAS.

Prints the time per matrix, the bandwidth it reads the weights at, the ratio against cuBLAS
measured in the same run, how far the results are from cuBLAS's, and what that makes of one
decode step's weight reads.

    python3 benchmarks/bench_gpu_matmul.py            # on the GPU machine, a few minutes
    python3 benchmarks/bench_gpu_matmul.py --rows 4   # a batch-4 step
    python3 benchmarks/bench_gpu_matmul.py --quick    # small shapes, any machine: a smoke run
"""

import bench_gpu
import common

# name, in features, out features, bias, matrices of this shape in OPT-2.7b
OPT_SHAPES = [('attention projection', 2560, 2560, True, 128),
              ('mlp up', 2560, 10240, True, 32),
              ('mlp down', 10240, 2560, True, 32),
              ('output embedding', 2560, 50272, False, 1)]
QUICK_SHAPES = [('attention projection', 64, 64, True, 8), ('mlp up', 64, 256, True, 2),
                ('mlp down', 256, 64, True, 2), ('output embedding', 64, 512, False, 1)]
# At least this many distinct matrices per timed graph: together larger than any L2 cache.
MIN_COPIES = 8
SHAPE_COLUMNS = [('shape', 'shape'), ('in_features', 'in'), ('out_features', 'out'),
                 ('matrices', 'matrices'), ('mb_per_matrix', 'MB each'),
                 ('cublas_us', 'cuBLAS us'), ('cublas_tb_s', 'cuBLAS TB/s')]
VARIANT_TITLES = {'cublas': 'cuBLAS', 'bias_apart': 'bias apart', 'one_row': 'OneRowLinear',
                  'rows_reduction': 'rows reduction'}


def variant_classes(rows):
    """Return {key: nn.Linear or a subclass}: cuBLAS first, then the variants against it."""
    import torch
    from blip2_ros.decode import OneRowLinear

    class BiasApartLinear(torch.nn.Linear):
        def forward(self, input):  # noqa: A002 - nn.Linear's argument name
            return torch.nn.functional.linear(input, self.weight) + self.bias

    class RowsReductionLinear(torch.nn.Linear):
        def forward(self, input):  # noqa: A002 - nn.Linear's argument name
            flat = input.reshape(-1, self.in_features).float()
            # out features x rows x in features: each weight row next to all its products.
            output = (self.weight.float()[:, None, :] * flat[None]).sum(-1).t()
            if self.bias is not None:
                output = output + self.bias.float()
            return output.to(input.dtype).reshape(*input.shape[:-1], self.out_features)

    if rows == 1:
        return {'cublas': torch.nn.Linear, 'bias_apart': BiasApartLinear,
                'one_row': OneRowLinear}
    return {'cublas': torch.nn.Linear, 'bias_apart': BiasApartLinear,
            'rows_reduction': RowsReductionLinear}


def time_layers(layers, row, options, repeats):
    """Compile one call of every layer on ``row``; return (ms per call, first call s, outputs)."""
    import torch

    def apply_all(layers, row):
        return [layer(row) for layer in layers]

    compiled = torch.compile(apply_all, options=options, fullgraph=True)

    def call():
        if row.device.type == 'cuda':
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(layers, row)

    first_s, times = bench_gpu.time_caption(call, row.device, repeats, warmup=4)
    outputs = [output.clone() for output in call()]
    # A fresh start: torch would otherwise run the graph it compiled here again.
    torch._dynamo.reset()
    return common.summary(times)['p50'], first_s, outputs


def measure(shape, rows, device, dtype, options, repeats):
    """Time one shape as nn.Linear and as each variant; return the table row."""
    import torch

    name, in_features, out_features, bias, matrices = shape
    copies = max(matrices, MIN_COPIES)
    layers = torch.nn.ModuleList(
        torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        for _ in range(copies))
    inputs = torch.randn(rows, 1, in_features, device=device, dtype=dtype)
    weight_bytes = in_features * out_features * torch.tensor([], dtype=dtype).element_size()
    result = {'shape': name, 'in_features': in_features, 'out_features': out_features,
              'bias': bias, 'matrices': matrices, 'copies_timed': copies,
              'mb_per_matrix': weight_bytes / 1e6}
    expected = None
    for key, linear_class in variant_classes(rows).items():
        if key == 'bias_apart' and not bias:
            continue  # the same as nn.Linear
        # Bias-free layers too for the others, though the captioner leaves those to torch.
        for layer in layers:
            layer.__class__ = linear_class
        milliseconds, result[f'{key}_first_call_s'], outputs = time_layers(
            layers, inputs, options, repeats)
        expected = outputs if expected is None else expected  # cuBLAS's, the first
        result[f'{key}_us'] = milliseconds * 1000.0 / copies
        result[f'{key}_tb_s'] = weight_bytes / (result[f'{key}_us'] * 1e-6) / 1e12
        result[f'{key}_speedup'] = result['cublas_us'] / result[f'{key}_us']
        result[f'{key}_max_relative_difference'] = max(
            float((output.float() - reference.float()).abs().max()
                  / reference.float().abs().max())
            for output, reference in zip(outputs, expected))
    return result


def main(argv=None):
    """Run the comparison and print its table."""
    parser = common.argument_parser(
        __doc__.strip().splitlines()[0], 'small shapes, on the CPU unless a GPU is present')
    parser.add_argument('--rows', type=int, default=1,
                        help='rows per product: the batch size of the decode step (default 1)')
    args = parser.parse_args(argv)
    common.quiet_libraries()
    import torch
    from blip2_ros.decode import CUDA_STEP_COMPILE_OPTIONS

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print('bench_gpu_matmul: torch sees no CUDA GPU; run with --quick for the CPU smoke run')
        return 2
    device = torch.device('cuda' if cuda else 'cpu')
    dtype = torch.bfloat16 if cuda else torch.float32
    options = CUDA_STEP_COMPILE_OPTIONS if cuda else None
    shapes = QUICK_SHAPES if args.quick else OPT_SHAPES
    results = {'benchmark': 'gpu_matmul', 'quick': args.quick, 'rows': args.rows,
               'machine': common.machine_info(), 'device': str(device), 'dtype': str(dtype),
               'compile_options': options, 'shapes': []}
    torch.manual_seed(0)
    keys = list(variant_classes(args.rows))
    for shape in shapes:
        # As the captioner runs: no autograd (a graph that records it has no CUDA graph).
        with torch.inference_mode():
            result = measure(shape, args.rows, device, dtype, options,
                             repeats=5 if args.quick else 50)
        results['shapes'].append(result)
        print(f"{result['shape']}: " + ', '.join(
            f"{VARIANT_TITLES[key]} {result[f'{key}_us']:.1f} us"
            for key in keys if f'{key}_us' in result) + ' per matrix', flush=True)
    # A variant that leaves a shape alone (bias apart, bias-free) costs what nn.Linear does.
    step = {key: sum(result.get(f'{key}_us', result['cublas_us']) * result['matrices']
                     for result in results['shapes']) / 1000.0 for key in keys}
    results['decode_step_weight_reads_ms'] = step
    columns = list(SHAPE_COLUMNS)
    for key in keys[1:]:
        title = VARIANT_TITLES[key]
        columns += [(f'{key}_us', f'{title} us'), (f'{key}_tb_s', f'{title} TB/s'),
                    (f'{key}_speedup', f'{title} x faster'),
                    (f'{key}_max_relative_difference', f'{title} max rel. diff')]
    print()
    print(common.table(results['shapes'], columns))
    print(f"\nOne decode step's weight reads (every matrix once, {args.rows} row(s)): "
          + ', '.join(f'{VARIANT_TITLES[key]} {step[key]:.3f} ms '
                      f"({step['cublas'] / step[key]:.2f}x)" for key in keys))
    return common.finish(results, args.json)


if __name__ == '__main__':
    raise SystemExit(main())
