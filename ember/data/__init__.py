"""ember.data: from text files to training batches (sources, tokenizers, indexed datasets, samples, loaders)."""


def __getattr__(name):
    # Imported on first use, so `ember preprocess` never pays for the loader's torch import.
    if name == "build_datasets":
        from ember.data.blending import build_datasets

        return build_datasets
    if name == "DataLoader":
        from ember.data.loader import DataLoader

        return DataLoader
    raise AttributeError(name)
