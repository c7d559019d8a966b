"""Sweeps (`compress run`): a run file expanded into jobs (runfile.py, plan.py), each compressed and evaluated
once, resumably (runner.py, run.py), in this process or as Ray tasks (ray_tasks.py, job_process.py), with typed
records of what each job wrote (records.py). It drives compress and eval; the CLI calls it and nothing imports it
back."""
