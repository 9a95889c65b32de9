"""Running rcic on Kaggle: a chain of budgeted stage kernels and an offline submission kernel.

- metadata.py  kernel-metadata.json and dataset-metadata.json: render and check Kaggle's rules
- chain.py     `rcic-chain init`: render the stage kernels and the submission kernel into a folder
- bundle.py    the Kaggle dataset that carries rcic and the wheels Kaggle's image lacks
- client.py    push / status / output / submit / publish through the real `kaggle` client
               (imported lazily: `import kaggle` authenticates, and `import rcic` must never
               need credentials); waiting retries a lost network with backoff
- driver.py    `rcic-chain push`: each kernel exactly once, however often the driver dies
- record.py    DIR/pushes.json: what the driver pushed, written before it waits
- lock.py      one driver per chain folder (an OS lock that dies with its process)
- submit.py    `rcic-chain submit`: the submission kernel's output to the competition, the scores
- cost.py      `rcic-chain status`: states, run times, GPU hours used and still needed
- kernel.py    what a kernel does once rcic is installed: find inputs, run the stage or predict
- local.py     `rcic-chain local`: the whole chain on this machine, the way Kaggle runs it
- plan.py      how many stages a recipe needs, from a measured throughput
"""
