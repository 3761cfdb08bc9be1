"""The data the stages read: loading and checking datasets (data), the generated task families
(tasks, their word lists in task_data/) and the generate_data stage (datagen).
"""
