"""The scenario tables behind the smoke data: data only, no code that generates anything.

`SCENARIOS` lists the dialogue types (slot values, the core turns that state them and three
summary templates each); `FILLER` and `REACTIONS` are small talk that pads a dialogue without
carrying a slot value; `GREETINGS` and `CLOSINGS` open and close it. `SPLITS` gives each split's
size and seed, and `MIN_TURNS`..`MAX_WORDS` bound a dialogue's length. The generator that turns
these into rows is `clustertune.smoke.dialogues`. The chat tables at the end (`CHAT_SPLITS`,
system prompts and the reply style each asks for, follow-up questions, slot labels) are read
by `clustertune.smoke.chats`.

Changing anything here changes the generated assets: bump `SMOKE_VERSION` in
`clustertune.smoke.assets` when you do.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = {  # split name -> (rows, seed); test is held out: no seed is shared with train
    "train": (2000, 0),
    "validation": (200, 1),
    "test": (200, 2),
}


@dataclass(frozen=True)
class Scenario:
    """A dialogue type: slot values, core turns that state them, and summary templates.

    Each core turn is a tuple of alternative phrasings; turns alternate #Person1#, #Person2#
    starting with #Person1#. `summaries[0]` is the training target, all three are the test
    references (paraphrases of the same slots).
    """

    topic: str
    slots: dict[str, tuple[str, ...]]
    short_core: tuple[tuple[str, ...], ...]
    long_core: tuple[tuple[str, ...], ...]
    summaries: tuple[str, str, str]


DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        topic="restaurant booking",
        slots={
            "party": ("two", "three", "four", "five", "six", "eight"),
            "time": ("six", "seven", "eight", "nine", "half past seven"),
            "restaurant": (
                "Luigi's",
                "the Golden Dragon",
                "Cafe Rosa",
                "the Blue Moon",
                "Sakura House",
                "the Old Mill",
            ),
        },
        short_core=(
            (
                "I would like to book a table for {party} at {restaurant} at {time}.",
                "Can I reserve a table for {party} people at {restaurant}? We will come at {time}.",
            ),
            (
                "Certainly. A table for {party} at {time}. See you tonight.",
                "No problem, your table for {party} is ready at {time}.",
            ),
        ),
        long_core=(
            ("Hello, is this {restaurant}?", "Hi, I am calling {restaurant}, right?"),
            ("Yes, it is. How can I help you?", "That is right. What can I do for you?"),
            (
                "I need a table for {party} tonight.",
                "I want to book a table for {party} people tonight.",
            ),
            ("What time would you like?", "Sure. At what time?"),
            ("At {time}, please.", "We will be there at {time}."),
        ),
        summaries=(
            "#Person1# books a table for {party} at {time} at {restaurant}.",
            "#Person1# reserves a table at {restaurant} for {party} people at {time}.",
            "#Person2# helps #Person1# book a table for {party} at {restaurant} at {time}.",
        ),
    ),
    Scenario(
        topic="train tickets",
        slots={
            "count": ("two", "three", "four", "five"),
            "city": ("Paris", "London", "Berlin", "Rome", "Madrid", "Vienna", "Prague", "Dublin"),
            "day": DAYS,
        },
        short_core=(
            (
                "I would like {count} tickets to {city} for {day}, please.",
                "Can I buy {count} train tickets to {city}? I want to travel on {day}.",
            ),
            (
                "Here are your {count} tickets to {city}. The train leaves on {day} morning.",
                "OK, {count} tickets to {city} on {day}. Have a good trip.",
            ),
        ),
        long_core=(
            ("I want to go to {city}.", "Do you have trains to {city}?"),
            ("When do you want to travel?", "Sure. What day?"),
            ("On {day}, please.", "This {day}, if possible."),
            ("How many tickets?", "How many people are going?"),
            ("I need {count} tickets, please.", "We need {count} tickets."),
        ),
        summaries=(
            "#Person1# buys {count} tickets to {city} for {day}.",
            "#Person1# gets {count} train tickets to {city} for {day}.",
            "#Person2# sells #Person1# {count} tickets to {city} for {day}.",
        ),
    ),
    Scenario(
        topic="asking directions",
        slots={
            "place": (
                "museum",
                "bank",
                "train station",
                "library",
                "post office",
                "city hall",
                "cinema",
                "market",
            ),
            "street": ("Green", "Oak", "Maple", "King", "River", "Park", "Church", "Hill"),
            "direction": ("left", "right"),
        },
        short_core=(
            (
                "Excuse me, how do I get to the {place}?",
                "Sorry, can you tell me where the {place} is?",
            ),
            (
                "Go straight and turn {direction} onto {street} Street. You will see the {place} there.",
                "Turn {direction} onto {street} Street and the {place} is right in front of you.",
            ),
        ),
        long_core=(
            ("Excuse me, I think I am lost.", "Sorry to bother you, but I am lost."),
            ("Where do you want to go?", "Where are you going?"),
            ("I am looking for the {place}.", "I need to find the {place}."),
            (
                "Turn {direction} at the corner onto {street} Street and you will find it.",
                "It is on {street} Street. Turn {direction} at the lights.",
            ),
        ),
        summaries=(
            "#Person2# tells #Person1# to turn {direction} onto {street} Street to get to the {place}.",
            "#Person1# asks the way to the {place} and #Person2# says to turn {direction} onto {street} Street.",
            "#Person1# wants to find the {place}, which is on {street} Street.",
        ),
    ),
    Scenario(
        topic="job interview",
        slots={
            "name": ("Tom", "Anna", "Peter", "Lisa", "David", "Maria", "James", "Emma"),
            "job": (
                "teacher",
                "driver",
                "cook",
                "nurse",
                "engineer",
                "designer",
                "manager",
                "writer",
            ),
            "years": ("two", "three", "four", "five", "six", "ten"),
        },
        short_core=(
            (
                "Thank you for coming. Please tell me about yourself.",
                "Please have a seat and tell me why you want this job.",
            ),
            (
                "My name is {name}. I want the {job} job, and I have {years} years of experience.",
                "I am {name}. I have worked as a {job} for {years} years.",
            ),
        ),
        long_core=(
            (
                "Good morning. Please have a seat. What is your name?",
                "Hello. Can you tell me your name?",
            ),
            (
                "My name is {name}. I am here for the {job} job.",
                "I am {name}, and I applied for the {job} job.",
            ),
            ("How much experience do you have?", "How long have you done this kind of work?"),
            ("I have {years} years of experience.", "I have done it for {years} years."),
        ),
        summaries=(
            "#Person1# interviews {name} for the {job} job, and {name} has {years} years of experience.",
            "{name} has {years} years of experience and applies for the {job} job.",
            "#Person1# talks with {name}, who wants the {job} job and has worked for {years} years.",
        ),
    ),
    Scenario(
        topic="doctor visit",
        slots={
            "symptom": ("headache", "cough", "fever", "sore throat", "stomach ache", "back pain"),
            "duration": ("two days", "three days", "four days", "a week", "two weeks"),
            "advice": (
                "rest at home",
                "drink more water",
                "take this medicine",
                "stay in bed",
                "eat less sugar",
            ),
        },
        short_core=(
            (
                "Doctor, I have had a {symptom} for {duration}.",
                "I have had a bad {symptom} for {duration}, doctor.",
            ),
            (
                "I see. You should {advice} and come back if it gets worse.",
                "It is not serious. You should {advice}.",
            ),
        ),
        long_core=(
            ("Good morning, doctor.", "Hello, doctor. Thank you for seeing me."),
            ("Good morning. What seems to be the problem?", "What can I do for you today?"),
            ("I have a bad {symptom}.", "I have a {symptom} and I feel tired."),
            ("How long have you had it?", "When did it start?"),
            ("For about {duration}.", "I have had it for {duration}."),
            ("You should {advice}.", "Please {advice} and call me if it gets worse."),
        ),
        summaries=(
            "#Person1# has had a {symptom} for {duration}, and #Person2# tells #Person1# to {advice}.",
            "#Person2# advises #Person1#, who has had a {symptom} for {duration}, to {advice}.",
            "#Person1# sees a doctor about a {symptom} and is told to {advice}.",
        ),
    ),
    Scenario(
        topic="hotel check-in",
        slots={
            "hotel": (
                "the Grand Hotel",
                "the Sea View Hotel",
                "the Park Inn",
                "the Royal Hotel",
                "the Star Hotel",
                "the Lake House",
            ),
            "nights": ("two", "three", "four", "five", "seven"),
            "room": ("single", "double", "family", "quiet"),
        },
        short_core=(
            (
                "I would like a {room} room at {hotel} for {nights} nights.",
                "Hello, I have a booking at {hotel}. I need a {room} room for {nights} nights.",
            ),
            (
                "Welcome. Your {room} room is ready. Enjoy your {nights} nights with us.",
                "Here is the key to your {room} room. Enjoy your stay.",
            ),
        ),
        long_core=(
            ("Good evening. Is this {hotel}?", "Hello, I would like to check in to {hotel}."),
            ("Yes. How long will you stay?", "Welcome. How many nights will you stay?"),
            ("For {nights} nights, please.", "I will stay {nights} nights."),
            ("What kind of room would you like?", "Which room would you like?"),
            ("A {room} room, please.", "I would like a {room} room."),
        ),
        summaries=(
            "#Person1# checks into {hotel} for {nights} nights and asks for a {room} room.",
            "#Person1# gets a {room} room at {hotel} for {nights} nights.",
            "#Person2# gives #Person1# a {room} room at {hotel} for {nights} nights.",
        ),
    ),
    Scenario(
        topic="shopping",
        slots={
            "color": ("red", "blue", "black", "white", "green", "brown"),
            "item": ("jacket", "shirt", "bag", "hat", "scarf", "sweater", "coat"),
            "price": ("twenty", "thirty", "forty", "fifty", "sixty", "eighty"),
        },
        short_core=(
            ("How much is this {color} {item}?", "I like this {color} {item}. What is the price?"),
            (
                "It is {price} dollars. It is a good choice.",
                "That one is {price} dollars, and it looks great on you.",
            ),
        ),
        long_core=(
            (
                "Excuse me, do you sell a {item} like this one?",
                "Hi, I am looking for a new {item}.",
            ),
            ("Yes. What color would you like?", "Sure. Which color do you want?"),
            ("I would like a {color} one.", "Do you have it in {color}?"),
            ("Here you are. It is {price} dollars.", "Yes, we do. It costs {price} dollars."),
            ("Good, I will take it.", "That is fine. I will buy it."),
        ),
        summaries=(
            "#Person1# buys a {color} {item} for {price} dollars.",
            "#Person1# pays {price} dollars for a {color} {item}.",
            "#Person2# sells #Person1# a {color} {item} for {price} dollars.",
        ),
    ),
    Scenario(
        topic="meeting",
        slots={
            "name": (
                "Mr. Johnson",
                "Ms. Lee",
                "Mr. Smith",
                "Ms. Clark",
                "Dr. Wilson",
                "Mrs. Taylor",
            ),
            "day": DAYS[:5],
            "time": ("ten", "eleven", "two", "three", "four"),
        },
        short_core=(
            (
                "I would like to meet {name} on {day} at {time}.",
                "Can I see {name} on {day} at {time}?",
            ),
            (
                "{name} is free on {day} at {time}. I will put it in the calendar.",
                "Yes, {day} at {time} is fine for {name}.",
            ),
        ),
        long_core=(
            ("I need to see {name} this week.", "Is {name} in the office this week?"),
            ("Which day is good for you?", "What day would you like?"),
            ("How about {day}?", "Would {day} be possible?"),
            ("That is fine. What time?", "OK. At what time?"),
            ("At {time}, if possible.", "I can come at {time}."),
        ),
        summaries=(
            "#Person1# makes an appointment to meet {name} on {day} at {time}.",
            "#Person2# arranges a meeting for #Person1# with {name} on {day} at {time}.",
            "#Person1# will meet {name} at {time} on {day}.",
        ),
    ),
)

# Small talk that pads dialogues to a random length; it never carries a slot value.
FILLER = (
    "It is really cold today.",
    "I hope it does not rain later.",
    "The traffic was terrible this morning.",
    "I did not sleep well last night.",
    "My sister is visiting me soon.",
    "Have you seen the new film everyone talks about?",
    "I have been so busy at work lately.",
    "The weather has been lovely recently.",
    "I am trying to drink less coffee.",
    "My neighbor has a new dog.",
    "We are painting the kitchen this month.",
    "I just finished a very long book.",
    "The bus was late again today.",
    "I think I need a holiday soon.",
    "My phone battery is almost empty.",
    "I went running yesterday.",
    "Our team lost the game last night.",
    "I am learning to play the guitar.",
    "It feels like summer is almost here.",
    "My brother just moved to a new flat.",
    "The garden looks beautiful in spring.",
    "I forgot my umbrella at home.",
    "My children love the new playground.",
    "I have to call my mother tonight.",
    "The shops are very busy these days.",
    "I could not find a place to park.",
    "This city gets more crowded every year.",
    "I really like your shoes.",
    "Do you know a good place for lunch around here?",
    "I am sorry, I am a little tired.",
    "I started cooking at home more often.",
    "Everything is so expensive now.",
)
REACTIONS = (
    "Oh, really?",
    "I know what you mean.",
    "That sounds nice.",
    "Yes, I agree.",
    "I see.",
    "That is a pity.",
    "Me too.",
    "Good for you.",
    "Not at all.",
    "Right.",
)
GREETINGS = ("Good morning.", "Hello.", "Hi there.", "Good afternoon.", "Excuse me.")
CLOSINGS = ("Thank you very much.", "Goodbye.", "Have a nice day.", "Thanks for your help.")

MIN_TURNS, MAX_TURNS = 2, 10
MIN_WORDS, MAX_WORDS = 30, 250

# ---------------------------------------------------------------------------------------
# Chat data (`clustertune.smoke.chats`): conversations with an assistant about the scenarios
# ---------------------------------------------------------------------------------------

# Seeds apart from SPLITS'. chat_test is held out (its own seed, and no conversation equal to
# a chat_train one) and always ends with an informative reply, its evaluation reference.
CHAT_SPLITS = {  # split name -> (rows, seed)
    "chat_train": (2000, 10),
    "chat_validation": (200, 11),
    "chat_test": (200, 12),
}
MIN_EXCHANGES, MAX_EXCHANGES = 1, 3  # user + assistant turns per conversation

# System prompts and the reply style each asks for: 0 (or no system turn) gives the full
# replies, 1 the brief ones, so the system turn changes what the assistant says.
SYSTEM_PROMPTS = (
    ("You are a helpful assistant.", 0),
    ("You are a helpful assistant for a busy office. Answer every question in full.", 0),
    ("You are a helpful assistant. Answer briefly.", 1),
    ("Keep your answers short.", 1),
)
SUMMARIZE_REQUEST = "Summarize the following conversation.\n\n{dialogue}"
FOLLOW_UPS = (
    "Sorry, what was the {label} again?",
    "Can you tell me the {label} again?",
    "Which {label} was it?",
)
# Style 0 says which slot it answers; style 1 gives the value alone ("Four.").
FOLLOW_UP_ANSWERS = ("The {label} is {value}.", "{Value}.")
CLOSING_REPLIES = ("You are welcome. Have a nice day.", "You are welcome.")
# What a follow-up question calls each scenario slot.
SLOT_LABELS = {
    "party": "party size",
    "time": "time",
    "restaurant": "restaurant",
    "count": "number of tickets",
    "city": "city",
    "day": "day",
    "place": "place",
    "street": "street name",
    "direction": "direction",
    "name": "name",
    "job": "job",
    "years": "number of years",
    "symptom": "problem",
    "duration": "duration",
    "advice": "advice",
    "hotel": "hotel",
    "nights": "number of nights",
    "room": "room type",
    "color": "color",
    "item": "item",
    "price": "price in dollars",
}


# ---------------------------------------------------------------------------------------
# Agent data (`clustertune.smoke.agents`): the same requests served through tool calls
# ---------------------------------------------------------------------------------------

AGENT_SPLITS = {  # split name -> (rows, seed); agent_test is held out as chat_test is
    "agent_train": (2000, 20),
    "agent_validation": (200, 21),
    "agent_test": (200, 22),
}
# The tool that serves each scenario: its parameters are the scenario's slots (all strings).
TOOL_NAMES = {
    "restaurant booking": "book_table",
    "train tickets": "buy_train_tickets",
    "asking directions": "find_place",
    "job interview": "schedule_interview",
    "doctor visit": "book_doctor",
    "hotel check-in": "book_hotel",
    "shopping": "check_price",
    "meeting": "schedule_meeting",
}
TOOL_DESCRIPTION = "Serves a {topic} request."
# What a tool returns (JSON text) and how the assistant reports it: the reference code is
# copied from the tool's answer, so the final reply needs attention to the tool message.
TOOL_RESULT = '{{"status": "done", "reference": "{code}"}}'
TOOL_REPLIES = (
    "Done: {summary} Your reference is {code}.",
    "All set. {summary} Reference {code}.",
)
PARALLEL_REPLY = "Both are done. References {code} and {code2}."
REASONING = "The user asks about {topic}. {facts} I can answer with these values."
REASONING_FACT = "The {label} is {value}."
AGENT_MIX = (  # conversation kinds of an agent split and their shares
    ("tool", 0.35),  # one request, one call, its result, the reply
    ("rounds", 0.15),  # two requests one after the other: two rounds of call and reply
    ("parallel", 0.15),  # two requests in one message: two calls in one turn
    ("reasoning", 0.2),  # the reply reasons first (reasoning_content), no tools
    ("chat", 0.15),  # a plain conversation from the chat generator, no tools
)
