"""Numbers reported in the papers, in one place, each with the table it comes from.

He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016 (arXiv:1512.03385).
Xie, Girshick, Dollar, Tu, He. Aggregated Residual Transformations for Deep Neural Networks. CVPR 2017.
"""

# Table 1: multiply-adds ("FLOPs") at 224x224, in units of 10^9.
TABLE1_MULT_ADDS = {18: 1.8e9, 34: 3.6e9, 50: 3.8e9, 101: 7.6e9, 152: 11.3e9}

# Table 1: blocks per stage (conv2_x .. conv5_x).
TABLE1_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# Table 6: CIFAR-10 test error (%) and parameters. ResNet-110 is "best (mean +- std)" over 5 runs: 6.43 (6.61 +- 0.16).
TABLE6_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
TABLE6_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
TABLE6_RESNET110_MEAN_STD = (6.61, 0.16)

# ImageNet validation top-1 error (%), 10-crop testing. Table 2: plain-18/34, ResNet-18, ResNet-34 (option A).
# Table 3: ResNet-34 with options A/B/C and ResNet-50/101/152 (option B).
IMAGENET_TOP1_10CROP = {
    "plain18": (27.94, "Table 2"),
    "plain34": (28.54, "Table 2"),
    "resnet18": (27.88, "Table 2"),
    "resnet34/A": (25.03, "Table 3"),
    "resnet34/B": (24.52, "Table 3"),
    "resnet34/C": (24.19, "Table 3"),
    "resnet50": (22.85, "Table 3"),
    "resnet101": (21.75, "Table 3"),
    "resnet152": (21.43, "Table 3"),
}

# Xie et al. 2017, Table 7: CIFAR-10 test error (%) and parameters of ResNeXt-29.
RESNEXT29_CIFAR10 = {"8x64d": (3.65, 34.4e6), "16x64d": (3.58, 68.1e6)}
