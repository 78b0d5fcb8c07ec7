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
One-row products with blip2-opt-2.7b's weight shapes: cuBLAS against OneRowLinear.

A batch-1 decode step multiplies one row by every weight matrix of the language model, so its
speed is how fast the GPU reads those weights. For each Linear shape of OPT-2.7b (the attention
projections, 2560 x 2560; the MLP, 2560 -> 10240 and 10240 -> 2560, all with a bias; the output
embedding, 2560 -> 50272, without), as many distinct bfloat16 matrices as the model has (so the
L2 cache cannot hold them) are each multiplied by one row in one compiled graph, compiled as
the captioner compiles on GPUs (CUDA graph, coordinate descent tuning):

* ``cuBLAS``: plain nn.Linear layers: the matmul kernels torch picks (the baseline);
* ``bias apart`` (layers with a bias): the product without the bias, then the bias added.
  With coordinate descent tuning on, torch itself rewrites a one-row product without a bias
  as a reduction (its output embedding row shows that), so this measures torch's own
  reduction where OneRowLinear writes one;
* ``OneRowLinear``: the captioner's layers, a reduction inductor writes and tunes.

Prints the time per matrix, the bandwidth it reads the weights at, the ratio against cuBLAS
measured in the same run, how far the two results are apart, and what that makes of one decode
step's weight reads.

    python3 benchmarks/bench_gpu_matmul.py           # on the GPU machine, a few minutes (compiles)
    python3 benchmarks/bench_gpu_matmul.py --quick   # small shapes, any machine: a smoke run
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
COLUMNS = [('shape', 'shape'), ('in_features', 'in'), ('out_features', 'out'),
           ('matrices', 'matrices'), ('mb_per_matrix', 'MB each'),
           ('cublas_us', 'cuBLAS us'), ('cublas_tb_s', 'cuBLAS TB/s'),
           ('bias_apart_us', 'bias apart us'), ('bias_apart_tb_s', 'bias apart TB/s'),
           ('one_row_us', 'OneRowLinear us'), ('one_row_tb_s', 'OneRowLinear TB/s'),
           ('speedup', 'x faster than cuBLAS'), ('max_relative_difference', 'max rel. diff')]


def bias_apart_class():
    """Return an nn.Linear that adds its bias after a bias-free product."""
    import torch

    class BiasApartLinear(torch.nn.Linear):
        def forward(self, input):  # noqa: A002 - nn.Linear's argument name
            return torch.nn.functional.linear(input, self.weight) + self.bias

    return BiasApartLinear


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
    return common.summary(times)['p50'], first_s, outputs


def measure(shape, device, dtype, options, repeats):
    """Time one shape as nn.Linear and as OneRowLinear; return the table row."""
    import torch
    from blip2_ros.captioner import OneRowLinear

    name, in_features, out_features, bias, matrices = shape
    copies = max(matrices, MIN_COPIES)
    layers = torch.nn.ModuleList(
        torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        for _ in range(copies))
    row = torch.randn(1, 1, in_features, device=device, dtype=dtype)
    cublas_ms, cublas_first_s, expected = time_layers(layers, row, options, repeats)
    # A fresh start: torch would otherwise run the graph it compiled for nn.Linear again.
    torch._dynamo.reset()
    bias_apart_ms = bias_apart_first_s = bias_apart_outputs = None
    if bias:
        for layer in layers:
            layer.__class__ = bias_apart_class()
        bias_apart_ms, bias_apart_first_s, bias_apart_outputs = time_layers(
            layers, row, options, repeats)
        torch._dynamo.reset()
    for layer in layers:
        # Bias-free ones too, though the captioner leaves those to torch: to show why.
        layer.__class__ = OneRowLinear
    one_row_ms, one_row_first_s, outputs = time_layers(layers, row, options, repeats)

    def difference(outputs):
        return max(float((output.float() - reference.float()).abs().max()
                         / reference.float().abs().max())
                   for output, reference in zip(outputs, expected))

    weight_bytes = in_features * out_features * torch.tensor([], dtype=dtype).element_size()
    row_of_table = {
        'shape': name, 'in_features': in_features, 'out_features': out_features,
        'bias': bias, 'matrices': matrices, 'copies_timed': copies,
        'mb_per_matrix': weight_bytes / 1e6,
        'cublas_us': cublas_ms * 1000.0 / copies, 'one_row_us': one_row_ms * 1000.0 / copies,
        'bias_apart_us': None if bias_apart_ms is None else bias_apart_ms * 1000.0 / copies,
        'cublas_first_call_s': cublas_first_s, 'one_row_first_call_s': one_row_first_s,
        'bias_apart_first_call_s': bias_apart_first_s,
        'max_relative_difference': difference(outputs),
        'bias_apart_max_relative_difference': (None if bias_apart_outputs is None
                                               else difference(bias_apart_outputs)),
    }
    for key in ('cublas', 'bias_apart', 'one_row'):
        microseconds = row_of_table[f'{key}_us']
        row_of_table[f'{key}_tb_s'] = (None if microseconds is None
                                       else weight_bytes / (microseconds * 1e-6) / 1e12)
    row_of_table['speedup'] = row_of_table['cublas_us'] / row_of_table['one_row_us']
    torch._dynamo.reset()
    return row_of_table


def main(argv=None):
    """Run the comparison and print its table."""
    parser = common.argument_parser(
        __doc__.strip().splitlines()[0], 'small shapes, on the CPU unless a GPU is present')
    args = parser.parse_args(argv)
    common.quiet_libraries()
    import torch
    from blip2_ros.captioner import CUDA_STEP_COMPILE_OPTIONS

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print('bench_gpu_matmul: torch sees no CUDA GPU; run with --quick for the CPU smoke run')
        return 2
    device = torch.device('cuda' if cuda else 'cpu')
    dtype = torch.bfloat16 if cuda else torch.float32
    options = CUDA_STEP_COMPILE_OPTIONS if cuda else None
    shapes = QUICK_SHAPES if args.quick else OPT_SHAPES
    results = {'benchmark': 'gpu_matmul', 'quick': args.quick,
               'machine': common.machine_info(), 'device': str(device), 'dtype': str(dtype),
               'compile_options': options, 'rows': []}
    torch.manual_seed(0)
    for shape in shapes:
        # As the captioner runs: no autograd (a graph that records it has no CUDA graph).
        with torch.inference_mode():
            row = measure(shape, device, dtype, options, repeats=5 if args.quick else 50)
        results['rows'].append(row)
        print(f"{row['shape']}: cuBLAS {row['cublas_us']:.1f} us, bias apart "
              f"{common.format_value(row['bias_apart_us'], 1)} us, OneRowLinear "
              f"{row['one_row_us']:.1f} us per matrix ({row['speedup']:.2f}x)", flush=True)
    # Bias apart leaves bias-free layers as they are: their nn.Linear time counts.
    step = {key: sum((row[f'{key}_us'] if row[f'{key}_us'] is not None else row['cublas_us'])
                     * row['matrices'] for row in results['rows']) / 1000.0
            for key in ('cublas', 'bias_apart', 'one_row')}
    results['decode_step_weight_reads_ms'] = step
    print()
    print(common.table(results['rows'], COLUMNS))
    print(f"\nOne decode step's weight reads (every matrix once): cuBLAS {step['cublas']:.3f} "
          f"ms, bias apart {step['bias_apart']:.3f} ms "
          f"({step['cublas'] / step['bias_apart']:.2f}x faster), OneRowLinear "
          f"{step['one_row']:.3f} ms ({step['cublas'] / step['one_row']:.2f}x faster)")
    return common.finish(results, args.json)


if __name__ == '__main__':
    raise SystemExit(main())
