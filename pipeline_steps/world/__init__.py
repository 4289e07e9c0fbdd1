"""The simulated suggested-response world: a customer and a business that react to the words sent.

It stands in for live traffic so that "deploy pi and collect trajectories" (Algorithm 1, step 4) and
A/B tests run on one machine. :mod:`.simulator` holds the dynamics, :mod:`.featurizer` reads messages,
and ``verticals/*.yaml`` holds the data that defines a business vertical.
"""
