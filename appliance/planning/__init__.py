"""Planning: the hardware probe (NVML, CPU, RAM, disk), inventories, the offline memory
estimator and the planner that places each model. Core code: `appliance up`, the
deployment controller and the installer all plan with it."""
