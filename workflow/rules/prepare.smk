# Validate images against the taxonomy; write the manifest, class and rejects tables.
rule prepare:
    input:
        unpack(dataset_inputs),
    output:
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        rejects=f"{RESULTS}/rejects.parquet",
    params:
        settings=settings("data", "ranks"),
        images=images_fingerprint,
    log:
        f"{LOGS}/prepare.log",
    benchmark:
        f"{BENCH}/prepare.tsv"
    script:
        "../scripts/prepare.py"
