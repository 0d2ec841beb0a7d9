"""The texts of the `kiln prep` end-to-end corpus (tests/test_prep_e2e.py): sentences in seven languages, a long
document and a near copy, a footer repeated across documents, personal data, a passage quoted from an evaluation set."""

LANGS = ["en", "de", "es", "it", "pl", "ru", "zh"]

SENTENCES = {
    "en": [
        "The old harbour town grew quickly after the railway arrived in the late nineteenth century.",
        "Fishermen still mend their nets on the stone quay every morning before the tide turns.",
        "Most visitors come in summer, when the narrow streets fill with music and the smell of grilled fish.",
        "In winter the wind from the north makes it hard to walk along the cliffs without a heavy coat.",
        "Our library has decided to extend its opening hours so that students can study in the evenings.",
        "The new reading room on the second floor offers quiet desks, good lamps and free wireless access.",
        "Volunteers will help older readers who want to learn how to borrow electronic books from home.",
        "The council expects that the changes will cost less than the repairs to the roof last year.",
        "Baking bread at home requires patience, because the dough needs several hours to rise properly.",
        "A simple loaf needs only flour, water, salt and a little yeast that has been kept warm.",
        "Many beginners knead the dough for too short a time and then wonder why the crumb is dense.",
        "If you leave the loaf to cool on a rack, the crust stays crisp and the inside sets evenly.",
    ],
    "de": [
        "Die kleine Stadt am Fluss ist bekannt für ihre alte Brücke und den lebhaften Wochenmarkt.",
        "Jeden Samstag verkaufen Bauern aus der Umgebung frisches Gemüse, Käse und selbst gebackenes Brot.",
        "Im Sommer sitzen die Leute bis spät in der Nacht in den Gärten der Gasthäuser am Ufer.",
        "Wer die Geschichte der Stadt kennenlernen möchte, sollte unbedingt das kleine Heimatmuseum besuchen.",
        "Unsere Schule hat in diesem Jahr einen neuen Garten angelegt, in dem die Kinder Kräuter pflanzen.",
        "Die Schüler lernen dabei, wie viel Arbeit nötig ist, bevor man im Herbst etwas ernten kann.",
        "Einige Eltern haben Werkzeuge gespendet und helfen an den Wochenenden beim Gießen der Beete.",
        "Die Lehrerin hofft, dass der Garten auch im nächsten Frühling wieder viele Freiwillige findet.",
        "Wenn man im Winter durch die Berge wandert, muss man das Wetter sehr genau beobachten.",
        "Schon nach wenigen Stunden kann dichter Nebel aufziehen und den Weg zurück ins Tal verdecken.",
        "Erfahrene Wanderer nehmen deshalb immer eine Karte, warme Kleidung und genug zu trinken mit.",
        "Außerdem sagen sie vor dem Aufbruch jemandem Bescheid, welche Route sie gehen wollen.",
    ],
    "es": [
        "El pequeño pueblo de la costa vive sobre todo de la pesca y del turismo durante el verano.",
        "Cada mañana los pescadores salen al mar antes del amanecer y vuelven cuando el sol ya calienta.",
        "En la plaza mayor hay un mercado donde se venden frutas, verduras y pescado muy fresco.",
        "Por la noche las familias pasean por el paseo marítimo y los niños juegan junto a la playa.",
        "Nuestra biblioteca municipal ha organizado un ciclo de lecturas para jóvenes durante el otoño.",
        "Cada semana un escritor diferente presentará su libro y responderá a las preguntas del público.",
        "Los organizadores esperan que muchos estudiantes participen y descubran el placer de leer.",
        "La entrada es gratuita, pero es necesario reservar una plaza porque la sala es pequeña.",
        "Preparar una buena paella requiere arroz de calidad, un caldo sabroso y mucha paciencia.",
        "Primero se sofríen las verduras en aceite de oliva y después se añade el arroz con cuidado.",
        "Es importante no remover el arroz mientras se cuece, para que se forme una capa dorada.",
        "Al final se deja reposar unos minutos antes de servirla a la mesa con unas rodajas de limón.",
    ],
    "it": [
        "Il piccolo paese sulle colline è famoso per il suo vino rosso e per le antiche cantine.",
        "Ogni autunno arrivano molti visitatori per partecipare alla vendemmia e assaggiare i prodotti locali.",
        "Le strade del centro storico sono strette e portano tutte alla piazza davanti alla chiesa.",
        "La sera gli abitanti si incontrano nei bar per bere un caffè e parlare delle novità del giorno.",
        "La nostra scuola ha organizzato un corso di fotografia per gli studenti degli ultimi anni.",
        "Durante le lezioni i ragazzi imparano a usare la luce naturale e a scegliere l'inquadratura giusta.",
        "Alla fine dell'anno le fotografie migliori saranno esposte nella biblioteca della città.",
        "Gli insegnanti sperano che questa esperienza aiuti i giovani a guardare il mondo con occhi diversi.",
        "Per preparare una buona pasta fatta in casa servono farina, uova e un po' di pazienza.",
        "Bisogna lavorare l'impasto a lungo finché diventa liscio ed elastico sotto le mani.",
        "Poi si lascia riposare la pasta coperta da un panno per almeno mezz'ora prima di stenderla.",
        "Con il mattarello si ottiene una sfoglia sottile che si può tagliare in strisce di varie larghezze.",
    ],
    "pl": [
        "Małe miasteczko nad jeziorem słynie z pięknych lasów i spokojnych ścieżek rowerowych.",
        "Latem przyjeżdża tu wielu turystów, którzy chcą odpocząć od hałasu dużych miast.",
        "Na rynku można kupić świeże ryby, miód od lokalnych pszczelarzy i domowe przetwory.",
        "Wieczorem mieszkańcy spotykają się na brzegu jeziora, aby podziwiać zachód słońca.",
        "Nasza biblioteka miejska przygotowała nowy program zajęć dla dzieci w wieku szkolnym.",
        "Podczas spotkań dzieci czytają książki, rozmawiają o bohaterach i rysują własne ilustracje.",
        "Bibliotekarze mają nadzieję, że dzięki temu więcej młodych ludzi polubi czytanie.",
        "Zajęcia odbywają się w każdą środę po południu i są całkowicie bezpłatne dla uczestników.",
        "Pieczenie chleba w domu wymaga cierpliwości, ponieważ ciasto musi długo rosnąć.",
        "Do prostego bochenka potrzebna jest mąka, woda, sól i odrobina drożdży lub zakwasu.",
        "Wielu początkujących piekarzy wyrabia ciasto zbyt krótko i dziwi się, że chleb jest twardy.",
        "Gotowy bochenek najlepiej wystudzić na kratce, aby skórka pozostała chrupiąca.",
    ],
    "ru": [
        "Небольшой город на берегу реки известен своими старыми деревянными домами и тихими улицами.",
        "Летом сюда приезжает много туристов, которые хотят отдохнуть от шума большого города.",
        "На центральной площади по субботам работает рынок, где продают овощи, мёд и свежий хлеб.",
        "Вечером жители гуляют по набережной и смотрят, как солнце медленно опускается за лес.",
        "Наша городская библиотека открыла новый читальный зал для студентов и школьников.",
        "В зале есть удобные столы, хорошее освещение и бесплатный доступ к интернету.",
        "Библиотекари надеются, что молодые люди будут чаще приходить сюда заниматься после уроков.",
        "Кроме того, по выходным здесь проходят встречи с известными писателями и поэтами.",
        "Чтобы испечь хороший хлеб дома, нужно много терпения, потому что тесто долго поднимается.",
        "Для простой буханки нужны только мука, вода, соль и немного дрожжей или закваски.",
        "Многие начинающие пекари слишком мало месят тесто и потом удивляются плотному мякишу.",
        "Готовый хлеб лучше остудить на решётке, чтобы корочка осталась хрустящей.",
    ],
    "zh": [
        "这个小镇位于河边，以古老的石桥和热闹的周末集市而闻名。",
        "每个星期六，附近的农民都会来这里出售新鲜的蔬菜、水果和自家做的点心。",
        "夏天的晚上，人们喜欢坐在河边的茶馆里聊天，一直到很晚才回家。",
        "如果想了解小镇的历史，一定要去参观那座小小的地方博物馆。",
        "我们的学校今年开辟了一个新的菜园，孩子们在里面种植各种蔬菜和花草。",
        "学生们在劳动中学会了耐心，也明白了收获之前需要付出很多努力。",
        "一些家长捐赠了工具，并且在周末帮助老师一起给菜地浇水。",
        "老师希望明年春天还会有更多的志愿者愿意参加这个活动。",
        "在家里做面包需要耐心，因为面团要经过几个小时才能充分发酵。",
        "做一个简单的面包只需要面粉、水、盐和少量的酵母就可以了。",
        "很多初学者揉面的时间太短，结果烤出来的面包又硬又密。",
        "面包烤好以后最好放在架子上冷却，这样外皮才能保持酥脆。",
    ],
}

LONG = (
    "The lighthouse on the northern point was built in 1871 by a company of engineers from the capital, "
    "who had to carry every stone across the bay on flat boats during the calm weeks of late spring. "
    "For more than a century a keeper and his family lived in the small house beside the tower, "
    "cleaning the great lens each morning and winding the clockwork that turned the light at night.\n\n"
    "Records kept by the last keeper describe storms that lasted for days, ships that ran aground on "
    "the reef in fog, and a winter when the supply boat could not land for almost six weeks. "
    "The family survived on dried fish, potatoes from their garden and the goats that grazed on the "
    "rough grass between the rocks, while the light kept burning without a single missed night.\n\n"
    "Today the light is automatic and the keeper's house has become a museum that opens in summer. "
    "Visitors can climb the spiral stairs to the lantern room, read the old logbooks behind glass, and "
    "look out over the water where the wrecks still lie, marked on the charts as a warning to sailors."
)
NEAR = LONG.replace("six weeks", "seven weeks").replace("dried fish", "salted fish")
FINNISH = (
    "Pieni kaupunki järven rannalla on tunnettu kauniista metsistään ja rauhallisista pyöräteistään. "
    "Kesällä tänne saapuu paljon matkailijoita, jotka haluavat levätä suurten kaupunkien melusta.\n\n"
    "Torilta voi ostaa tuoretta kalaa, hunajaa paikallisilta mehiläistarhaajilta ja kotitekoisia säilykkeitä. "
    "Illalla asukkaat kokoontuvat järven rannalle ihailemaan auringonlaskua."
)


FOOTER = "Copyright 2024 Harbour Media Group, all rights reserved."
CONTACT = (
    "The ferry timetable changes twice a year, in April and in October, when the winter service begins. "
    "Tickets can be bought on board or at the small office next to the pier, which opens an hour before the "
    "first crossing.\n\nQuestions about group bookings go to bookings@harbour-ferries.com or to the office on "
    "+44 20 7946 0958, and lost property is kept for three months at the same desk."
)
EVAL_PASSAGE = "the keeper wound the clockwork every evening so that the great lens turned through the night"
QUOTING = (
    "Our history club visited the old lighthouse last weekend and read the guide to each other on the way up. "
    "One page said that the keeper wound the clockwork every evening so that the great lens turned through the "
    "night, and that the family rarely left the point in winter. Afterwards we had tea in the museum cafe."
)
