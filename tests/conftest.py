import torch

# Results must not depend on the thread count, and the tests' tiny models run fastest on one
# thread: with two, OpenMP's busy-waiting makes them up to 100x slower on a loaded 2-core
# machine. Set at import, so module-scoped fixtures run single-threaded too.
torch.set_num_threads(1)
