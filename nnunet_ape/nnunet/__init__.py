"""Everything that knows nnU-Net's files and internals: raw datasets, crop datasets and pasting predictions back.
The rest of the library stays free of nnU-Net imports."""
