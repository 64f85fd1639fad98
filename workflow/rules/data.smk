# The embedded demo dataset: a synthetic taxonomy with planted traits and their ground-truth masks.
if config["data"].get("synthetic"):

    rule synthetic_data:
        output:
            manifest=f"{SYNTHETIC}/manifest.csv",
            taxonomy=f"{SYNTHETIC}/taxonomy.csv",
            traits=f"{SYNTHETIC}/traits.csv",
        log:
            f"{LOGS}/synthetic_data.log",
        benchmark:
            f"{BENCH}/synthetic_data.tsv"
        threads: synthetic_threads()
        params:
            settings=settings("data.synthetic"),
        script:
            "../scripts/synthetic_data.py"
