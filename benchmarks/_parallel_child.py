
import functools, json, resource, sys, time
import torch
from advguard.data import load_dataset
from advguard.ensemble import train_parallel
from advguard.models import build_model
from advguard.training import TrainConfig

if __name__ == "__main__":
    workers, n, epochs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    data = load_dataset("mnist", limit=n)
    build = functools.partial(build_model, "mlp3", "mnist")
    t0 = time.perf_counter()
    _, res = train_parallel(build, data, [0.1, 0.2, 0.3], None, TrainConfig(epochs=epochs),
                            progress=False, workers=workers)
    wall = time.perf_counter() - t0
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_mb = res.peak_rss_mb if workers > 1 else []
    print(json.dumps({"workers": workers, "wall_s": wall, "parent_peak_mb": parent,
                      "worker_peaks_mb": workers_mb,
                      "total_peak_mb": parent + sum(workers_mb)}))
