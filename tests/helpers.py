"""Settings shared by the tests: a tiny debug run of the synthetic benchmark."""

#: ``--set`` overrides for a run that takes about a second on one CPU.
DEBUG = [
    "data.name=synthetic",
    "data.options.n_train=160",
    "data.options.n_val=64",
    "data.options.n_test=64",
    "data.options.size=16",
    "data.options.bias=0.9",
    "data.image_size=16",
    "model.arch=small_cnn",
    "model.options.widths=[8,8]",
    "train.epochs=2",
    "train.batch_size=32",
    "train.progress=false",
    "train.augment=false",
]
