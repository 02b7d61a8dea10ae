"""The main job (make bench): the benchmark against cuDNN where there is a CUDA GPU; a
correctness self-check against torch, saying that timings need a GPU, where there is none."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    if torch.cuda.is_available():
        import bench_bn
        import common
        import report

        code = bench_bn.main(sys.argv[1:])
        results = Path(__file__).resolve().parent / "results" / common.results_dir_name("cuda")
        sys.exit(code or report.main([str(results / "bn.csv")]))
    from bnkernels import selfcheck

    sys.exit(selfcheck.main())
