"""What run.py calls: the config's checks (validate), the data's (data_checks), the workdir
(workdirs, lock), and the stages per --mode (main.run). The top layer: it imports every other."""
