# Validate images against the taxonomy; write the manifest, class and rejects tables.
DECODE_THREADS = 8  # prepare and cache_tokens: processes decoding images (Snakemake caps them at --cores)


rule prepare:
    input:
        unpack(dataset_inputs),
    output:
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        rejects=f"{RESULTS}/rejects.parquet",
    log:
        f"{LOGS}/prepare.log",
    benchmark:
        f"{BENCH}/prepare.tsv"
    # processes decoding the images (at most --cores; on a cluster its CPUs, profiles/slurm)
    threads: DECODE_THREADS
    params:
        settings=settings("data", "ranks"),
        images=images_fingerprint,
    script:
        "../scripts/prepare.py"
