"""The paper's CIFAR-10 experiments: degradation curves and Table 6 (:mod:`.reproduce`), layer responses of Fig. 7
(:mod:`.responses`)."""
