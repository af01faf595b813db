"""Images in: files and folders, packs, tfds sets, in-memory arrays, opened as random-access
sources (sources, catalog), a run's splits (dataset), and the data order f(seed, step) read on
host threads (stream). Imports no training code."""
